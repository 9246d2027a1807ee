"""atlas_train.ops"""
