"""atlas_train.eval"""
