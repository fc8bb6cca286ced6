"""`vcon-fx generate`: greedy text generation with a KV-cache decoder ONNX file in onnxruntime."""

from __future__ import annotations

from rich.markup import escape

from .render import console

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Add the `generate` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("generate", help="generate text greedily with a decoder ONNX file and its KV cache")
    p.add_argument("model", help="a .onnx file exported from a decoder language model (with its KV cache), or the decoder file "
                                   "of an encoder-decoder one (its .encoder.onnx beside it)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="the most tokens to add (default 32)")
    p.add_argument("--tokenizer", help="the folder of the model's tokenizer (default: the one recorded at export)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: every core)")


def run(args) -> int:
    from ..export.generate import generate_text

    with console.status("generating…"):
        result = generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens, tokenizer=args.tokenizer,
                               threads=args.threads)
    between = "" if result.continues_prompt else "\n→ "  # an encoder-decoder model answers the prompt
    console.print(f"{escape(args.prompt)}{between}[bold]{escape(result.text)}[/]", soft_wrap=True)
    console.print(f"[dim]{len(result.tokens)} new token(s) after a {result.prompt_tokens}-token prompt; prefill "
                  f"{result.prefill_ms:.1f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s[/]")
    return 0
