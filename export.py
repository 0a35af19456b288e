"""Export a training checkpoint as a Hub folder, and push it when asked:

    python export.py --ckpt runs/wetok/checkpoints/last.ckpt --out exported/wetok [--ema]
        [--push --repo-id user/wetok-f16 --private]

The folder holds model.safetensors, config.json (every constructor argument) and a model card;
load it anywhere with ``vistok.load_tokenizer(folder or repo id)``.
"""

import argparse

from vistok.generators.export import export

if __name__ == "__main__":
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a training checkpoint (.ckpt)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (else raw)")
    p.add_argument("--push", action="store_true", help="upload the folder to the Hub")
    p.add_argument("--repo-id", help="Hub repo for --push, e.g. user/wetok-f16")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    a = p.parse_args()
    folder = export(a.ckpt, a.out, a.ema, a.push, a.repo_id, a.private)
    files = ", ".join(sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()))
    print(f"exported {'EMA' if a.ema else 'raw'} weights of {a.ckpt} to {folder}: {files}")
