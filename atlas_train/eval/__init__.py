"""atlas_train.eval: what a trained model can do, measured the same way for every member of the family.

- `generate.generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, on_token)`: recurrent decoding
  with the model's cache (O(1) per token for memory models); `atlas-generate` streams a sample from a checkpoint.
- `perplexity`: loss by in-document position bucket, at the training context and 2x / 4x longer.
- `mqar`: multi-query associative recall; `niah`: single needle in a haystack (passkey, number, word). Both also
  write training shards in atlas-prep's format, from a random stream that evaluation never draws from (`streams`).
- `cli`: `atlas-eval --task ppl|mqar|niah`, a table on stdout and the full results as JSON.
"""
