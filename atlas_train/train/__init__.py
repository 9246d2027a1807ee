"""atlas_train.train"""
