"""atlas_train.data"""
