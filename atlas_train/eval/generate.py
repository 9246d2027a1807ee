"""Text generation with recurrent decoding: the prompt runs once through the full forward, then every new token
is one T=1 forward that carries the model's cache (fast weights, momentum, window and conv state; the attention
KV cache for hybrids and the transformer), so a memory model pays the same per token however long the context.

`atlas-generate --checkpoint DIR --prompt TEXT` streams the sample to stdout as it is produced.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from atlas_train.eval.sampling import sample_next


def _forward_prompt(model, ids: torch.Tensor, prefill_chunk: int | None):
    """Run the prompt through the model and return (last-position logits, cache).

    With `prefill_chunk`, the prompt goes in segments of that many tokens carrying the cache (a multiple of the
    model's chunk_size keeps the memory's chunk grid), so the full-vocabulary logits of a long prompt are never
    held all at once.
    """
    seg = ids.shape[1] if not prefill_chunk else prefill_chunk
    cache = None
    for start in range(0, ids.shape[1], seg):
        out = model(ids[:, start : start + seg], cache=cache, use_cache=True)
        cache = out.cache
    return out.logits[:, -1], cache


def _decode_step(model, cache: dict, cuda_graph: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """token (B,) -> logits (B, V) of the next position, the cache advancing inside. With `cuda_graph`, a
    `StaticDecodeStep`: every step replays one captured CUDA graph (static buffers without a graph on a CPU, which is
    how the tests check it); a cache that grows every step (an attention KV cache) cannot be captured and decodes by
    plain T=1 forwards, as without the option."""
    if cuda_graph:
        from atlas_train.eval.static_decode import GrowingCacheError, StaticDecodeStep

        device = next(iter(cache.values())).device
        try:
            return StaticDecodeStep(model, cache, use_graph=device.type == "cuda").step
        except GrowingCacheError:
            pass
    state = {"cache": cache}

    def plain(token: torch.Tensor) -> torch.Tensor:
        out = model(token[:, None], cache=state["cache"], use_cache=True)
        state["cache"] = out.cache
        return out.logits[:, -1]

    return plain


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    on_token: Callable[[torch.Tensor], None] | None = None,
    *,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk: int | None = None,
    cuda_graph: bool = False,
) -> torch.LongTensor:
    """Continue `input_ids` (B, T) or (T,) by `max_new_tokens` tokens; returns prompt + new tokens, same rank.

    temperature 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature) restricted to the top_k
    most likely (0: all) and to the top_p nucleus. `on_token(tokens)` is called with each step's (B,) tokens as soon
    as they exist (streaming). With `eos_id`, a row that produced it keeps producing it, and decoding stops once
    every row has. The model is put in eval mode for the call and restored afterwards. `cuda_graph`: each decode step
    of a memory model replays one CUDA graph (`_decode_step`): its few hundred small kernels launch as one, which
    is what bounds a decode step's time.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    single = input_ids.dim() == 1
    ids = input_ids[None] if single else input_ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (B, T) or (T,) tensor, got shape {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        new: list[torch.Tensor] = []
        if max_new_tokens > 0:
            logits, cache = _forward_prompt(model, ids, prefill_chunk)
            step = _decode_step(model, cache, cuda_graph) if max_new_tokens > 1 else None  # no step for one token
            finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            while True:
                token = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = token.masked_fill(finished, eos_id)
                    finished |= token == eos_id
                new.append(token)
                if on_token is not None:
                    on_token(token)
                if len(new) == max_new_tokens or bool(finished.all()):
                    break
                logits = step(token)
    finally:
        model.train(was_training)
    result = torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids.clone()
    return result[0] if single else result


class TextStreamer:
    """Turns a growing list of token ids into text printed piece by piece.

    Sentencepiece pieces do not map one-to-one to characters (byte fallback splits a character over several ids,
    and a word's leading space belongs to its piece), so each step decodes the whole continuation and prints the
    part that is new, holding back a trailing replacement character that the next byte may complete.
    """

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], object], prompt_ids: list[int]):
        # Decoding the continuation together with its prompt keeps the space that starts the first new piece.
        self.decode = decode
        self.write = write
        self.ids = list(prompt_ids)
        self.printed = decode(self.ids)

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token.reshape(-1)[0]))
        text = self.decode(self.ids)
        stable = text.rstrip("\ufffd")
        if stable.startswith(self.printed) and len(stable) > len(self.printed):
            self.write(stable[len(self.printed) :])
            self.printed = stable

    def finish(self) -> str:
        """Print whatever is still held back; return the full text (prompt included)."""
        text = self.decode(self.ids)
        if text.startswith(self.printed):
            self.write(text[len(self.printed) :])
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atlas-generate",
        description="Sample text from an exported ATLAS-family checkpoint with recurrent (O(1) per token) decoding.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="exported model dir (atlas-train export --checkpoint RUN_DIR --out DIR)"
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each decode step of a memory model as one CUDA graph (GPU only; a growing attention "
                        "cache decodes as without it)")
    return p


def main(argv: list[str] | None = None) -> int:
    from atlas_train.eval.checkpoint import UserError, load_for_eval, load_tokenizer, resolve_device

    args = build_parser().parse_args(argv)
    try:
        if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 0:
            raise UserError("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1, --max-new-tokens >= 0")
        if args.cuda_graph and resolve_device(args.device).type != "cuda":
            raise UserError(f"--cuda-graph needs a CUDA device, got --device {args.device}")
        loaded = load_for_eval(args.checkpoint, device=args.device, dtype=args.dtype)
        tokenizer = load_tokenizer(loaded.tokenizer_path)
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise UserError("--prompt encodes to no tokens")
    except UserError as err:
        print(f"atlas-generate: error: {err}", file=sys.stderr)
        return 2
    generator = torch.Generator(device=loaded.device).manual_seed(args.seed)
    streamer = TextStreamer(tokenizer.decode, lambda s: (sys.stdout.write(s), sys.stdout.flush()), prompt_ids)
    sys.stdout.write(streamer.printed)
    sys.stdout.flush()
    generate(
        loaded.model,
        torch.tensor(prompt_ids, dtype=torch.long, device=loaded.device),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        on_token=streamer,
        eos_id=tokenizer.eos_id() if tokenizer.eos_id() >= 0 else None,
        generator=generator,
        cuda_graph=args.cuda_graph,
    )
    streamer.finish()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
