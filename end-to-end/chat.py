#!/usr/bin/env python
"""Chat in the terminal with a prepared (quantized) model and DecDEC.

Uses the tokenizer's chat template (a plain "User:/Assistant:" transcript when it has none),
streams the answer as it is generated, keeps the conversation (the oldest turns are dropped when
it outgrows the context) and prints tokens/s after each answer. Decoding uses a static KV cache
and, on the GPU, a CUDA graph per DecDEC setting (decdec.generation).

Commands: /reset (forget the conversation), /decdec on|off, /k N or /k kind=N,... (k_chunk),
/help, /quit. Ctrl-C stops an answer; Ctrl-C at the prompt or end of input quits.

Examples:
  python end-to-end/chat.py --model-dir out/smollm2-135m-awq3
  python end-to-end/chat.py --model-dir out/smollm2-135m-awq3 --prompt "Tell me about Paris." --k-chunk 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import decdec
from decdec.generation import DecodeSession, load_for_generation, parse_k_chunk

HELP = "/reset  /decdec on|off  /k N (or /k kind=N,...)  /quit"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path, help="prepared model directory")
    p.add_argument("--k-chunk", help="k_chunk for every kind (e.g. 8) or per kind (kind=N,...); default: tuned config")
    p.add_argument("--no-decdec", action="store_true", help="start with DecDEC off")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="activation dtype (default: by device)")
    p.add_argument("--prompt", help="answer this one message and exit (non-interactive)")
    p.add_argument("--system", help="system message (when the chat template has a system role)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    p.add_argument("--max-context", type=int, default=4096, help="KV cache positions (default 4096, at most the model's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start, faster tokens)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.max_context < 2:
        p.error("--max-new-tokens must be positive and --max-context at least 2")
    if args.no_decdec and args.k_chunk is not None:
        p.error("--no-decdec and --k-chunk exclude each other")
    return args


class Chat:
    def __init__(self, model, tokenizer, args: argparse.Namespace):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        limit = getattr(model.config, "max_position_embeddings", None) or args.max_context
        self.session = DecodeSession(model, min(args.max_context, limit),
                                     cuda_graph=torch.device(args.device).type == "cuda" and not args.no_cuda_graph,
                                     compile=args.compile)
        self.history: list[dict] = []
        self.templated = getattr(tokenizer, "chat_template", None) is not None
        self.mode_on = "decdec"
        self.generator = torch.Generator(self.session.device).manual_seed(args.seed)
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    # ------------------------------------------------------------ settings

    def settings(self) -> str:
        groups = decdec.selection_groups(self.model)
        if all(g.mode == "none" for g in groups):
            return "DecDEC off"
        per_kind = {g.kind: g.k_chunk for g in groups}  # configure sets one k_chunk per kind
        return "DecDEC k_chunk " + ", ".join(f"{kind} {k}" for kind, k in per_kind.items())

    def command(self, line: str) -> bool:
        """Runs a /command; False means quit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            if cmd in ("/quit", "/exit"):
                return False
            if cmd == "/reset":
                self.history.clear()
                print("(conversation cleared)")
            elif cmd == "/decdec" and arg in ("on", "off"):
                decdec.configure(self.model, mode=self.mode_on if arg == "on" else "none")
                print(f"({self.settings()})")
            elif cmd == "/k" and arg:
                kinds = [g.kind for g in decdec.selection_groups(self.model)]
                decdec.configure(self.model, k_chunk=parse_k_chunk(arg, kinds))
                print(f"({self.settings()})")
            else:
                print(f"commands: {HELP}")
        except ValueError as e:
            print(f"({e})")
        return True

    # ------------------------------------------------------------ turns

    def render(self, messages: list[dict]) -> torch.Tensor:
        if self.templated:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)["input_ids"]
            return ids
        text = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n"
                       for m in messages if m["role"] != "system") + "Assistant:"
        return self.tokenizer(text, return_tensors="pt").input_ids

    def prompt_for(self, user: str) -> torch.Tensor | None:
        """The conversation plus ``user`` as ids, dropping the oldest turns until the answer fits."""
        system = [{"role": "system", "content": self.args.system}] if self.args.system and self.templated else []
        while True:
            ids = self.render(system + self.history + [{"role": "user", "content": user}])
            if ids.shape[1] + self.args.max_new_tokens <= self.session.max_len:
                return ids
            if not self.history:
                print(f"(message of {ids.shape[1]} tokens leaves no room for a {self.args.max_new_tokens}-token "
                      f"answer in a context of {self.session.max_len})")
                return None
            self.history = self.history[2:]

    def answer(self, user: str) -> None:
        ids = self.prompt_for(user)
        if ids is None:
            return
        new: list[int] = []
        printed = ""

        def stream(tokens: list[int]) -> None:
            nonlocal printed
            new.extend(tokens)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            # print only what is settled: a partial multi-byte character decodes to U+FFFD
            settled = text.rstrip("\ufffd")
            sys.stdout.write(settled[len(printed):])
            sys.stdout.flush()
            printed = settled

        try:
            result = self.session.generate(ids, self.args.max_new_tokens, temperature=self.args.temperature,
                                           top_k=self.args.top_k, eos_token_id=self.eos, on_tokens=stream,
                                           generator=self.generator)
        except KeyboardInterrupt:
            print("\n(answer interrupted)")
            return
        reply = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        print(f"\n[{len(result.tokens)} tokens, {result.tokens_per_s:.1f} tokens/s, {self.settings()}]")

    def loop(self) -> None:
        print(f"chat with {self.args.model_dir} ({self.settings()}); {HELP}"
              + ("" if self.templated else "\n(no chat template: a plain User:/Assistant: transcript)"))
        while True:
            try:
                line = input("\n> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.answer(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_for_generation(args.model_dir, args.device, args.dtype, args.no_decdec, args.k_chunk)
    if tokenizer is None:
        raise SystemExit(f"{args.model_dir} has no tokenizer: chat needs one (synthetic models have none)")
    chat = Chat(model, tokenizer, args)
    if args.prompt is not None:
        print(f"> {args.prompt}")
        chat.answer(args.prompt)
    else:
        chat.loop()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print()
        sys.exit(130)
