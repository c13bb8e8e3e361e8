"""Convert open_clip's CLIP BPE file into a diffusers/transformers tokenizer folder.

The real CLIP vocabulary ships inside open_clip's wheel as `open_clip/bpe_simple_vocab_16e6.txt.gz`.
Fetch it without installing open_clip (which drags torchvision in) and convert:

    pip download --no-deps open_clip_torch==3.3.0 -d .cache/wheels
    python scripts/make_clip_tokenizer.py .cache/wheels/open_clip_torch-3.3.0-py3-none-any.whl miniworld/models/shapes10/tokenizer

The output (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) is what
transformers' CLIPTokenizer reads; it is byte-for-byte the layout of openai/clip-vit-large-patch14.
"""
import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges (as open_clip's SimpleTokenizer does)


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_bpe(path: Path) -> list[str]:
    raw = path.read_bytes()
    if path.suffix == ".whl":
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            raw = zf.read(BPE_MEMBER)
    return gzip.decompress(raw).decode("utf-8").split("\n")[1 : N_MERGES + 1]


def convert(bpe_source: Path, out_dir: Path) -> None:
    merges = read_bpe(bpe_source)
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "clean_up_tokenization_spaces": True, "errors": "replace", **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {out_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
