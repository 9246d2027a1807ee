"""Corpus-to-shards pipeline (installed as atlas_train.data_prep; the `atlas-prep` command).

- `cli` / `prep`: inputs → sentencepiece tokenizer (trained or given) → encoder processes → packed rows → shards.
- `writer.write_dataset`: the shard + manifest writer every dataset producer shares (atlas-prep, eval tasks).
- `shard_format`: the on-disk format and `manifest.json` (read back by atlas_train.data).
"""
