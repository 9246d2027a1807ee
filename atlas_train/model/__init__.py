"""atlas_train.model"""
