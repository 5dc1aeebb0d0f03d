"""Peak memory of `automodel checkpoint consolidate` against DCP's own `dcp_to_torch_save`.

A checkpoint of a Llama with a few large tensors is written with our `save_checkpoint`; each
converter then runs in a fresh process that reports how much its peak RSS grew while converting
(libraries are imported before the baseline is read), as anonymous resident memory (RssAnon,
sampled every 2 ms; mapped file pages are not counted). Streaming should grow by about the
largest tensor, not by the model.

Usage: python benchmarks/consolidate_memory.py [--hidden 2048] [--vocab 8192] [--layers 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import psutil
    import torch, safetensors.torch, transformers  # noqa: F401  (imported before the baseline)
    from automodel_cli.components.checkpoint.consolidate import consolidate
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    def anonymous_rss():
        # RssAnon: memory the process owns. File pages that a reader maps (and the kernel can
        # drop at will) count in RSS but are not memory the conversion needs.
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return psutil.Process().memory_info().rss

    before = anonymous_rss()
    peak, done = [before], threading.Event()

    def sample():  # every 2 ms: ru_maxrss would include import-time peaks
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    if sys.argv[1] == "consolidate":
        consolidate(sys.argv[2], sys.argv[3])
    else:
        dcp_to_torch_save(sys.argv[2] + "/model", sys.argv[3] + ".pt")
    done.set()
    sampler.join()
    print(json.dumps({"grown_mib": (peak[0] - before) / 2**20}))
""")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from automodel_cli.components.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=16, num_key_value_heads=16, vocab_size=args.vocab,
                             tie_word_embeddings=False)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.to_empty(device="cpu")
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter)
        sizes = [p.numel() * 4 / 2**20 for p in model.parameters()]
        checkpoint = save_checkpoint(tmp_path / "run", 1, model=model, optimizer=None, scheduler=None,
                                     train_state={}, keep=1)
        del model
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        print(f"command: python benchmarks/consolidate_memory.py --hidden {args.hidden} --vocab {args.vocab} "
              f"--layers {args.layers}")
        print(f"model: {len(sizes)} tensors, {sum(sizes):.0f} MiB in all, largest {max(sizes):.0f} MiB (fp32)")
        results = {}
        for name in ("consolidate", "dcp_to_torch_save"):
            out = subprocess.run([sys.executable, str(script), name, str(checkpoint), str(tmp_path / name)],
                                 capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])["grown_mib"]
            print(f"{name:18s} anonymous memory grew by {results[name]:7.0f} MiB "
                  f"({results[name] / max(sizes):.1f}x the largest tensor, {results[name] / sum(sizes):.2f}x the model)")
        print(f"ratio consolidate / dcp_to_torch_save: {results['consolidate'] / results['dcp_to_torch_save']:.2f}x")


if __name__ == "__main__":
    main()
