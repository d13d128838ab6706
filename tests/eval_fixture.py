"""A tiny saved base (with tokenizer), a randomised L2D adapter and a local gsm8k-style file, for the
`l2d eval` command-line tests."""
import json

from l2d import get_l2d_model
from tiny import randomize_path, tiny_base, tiny_config
from tiny_tokenizer import VOCAB, tiny_tokenizer


def save_eval_folder(root, rows: list[dict]):
    """``root/base``, ``root/adapter`` and ``root/gsm8k.jsonl`` (``rows``: question/answer dicts)."""
    base = tiny_base(vocab_size=VOCAB, max_position_embeddings=512)
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    model = get_l2d_model(base, tiny_config())
    randomize_path(model)
    model.save_pretrained(str(root / "adapter"))
    (root / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
