"""Training: `atlas-train` (cli.py) runs trainer.train — DeepSpeed ZeRO engine, exact resume, faults, export.

config.py TrainConfig (`train:` section) · deepspeed_config.py the DeepSpeed dict · optim.py AdamW groups and the
warmup+cosine schedule · trainer.py the loop (Trainer, a method per phase) · checkpoint.py publish-by-`latest`
checkpoints · metrics.py tensorboard and metrics.jsonl · signals.py preemption (EXIT_PREEMPTED) · nonfinite.py NaN
policy · rng.py RNG capture · distributed.py process group · synthetic.py random batches for benchmarks · export.py
consolidated fp32 export.
"""
