"""Corpus-to-shards pipeline (imported as atlas_train.data_prep)."""
