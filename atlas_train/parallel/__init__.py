"""atlas_train.parallel"""
