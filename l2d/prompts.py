"""Chat rendering: the text a model sees for a prompt, the same in training, evaluation and ``l2d generate``.

A prompt (a string, or a list of chat messages) goes through the tokenizer's chat template with the
generation prompt appended, an optional system prompt first; ``chat_template=False`` gives the raw
text instead. Training (``l2d/data.py``) renders its prompts with these same functions.
"""
from __future__ import annotations


def require_chat_template(tokenizer) -> None:
    """Raise when ``tokenizer`` has no chat template to render messages with."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template. Use an "
            "instruct model's tokenizer, set `tokenizer.chat_template` to a Jinja template, or pass "
            "chat_template=False to concatenate prompt and completion raw (prompt/completion data only)."
        )


def render_prompt(tokenizer, prompt: str | list[dict], system_prompt: str | None = None,
                  chat_template: bool = True) -> str:
    """The text a model is given at inference for `prompt` (a string or a message list).

    Same rendering as training: chat template with the generation prompt, or the raw prompt.
    """
    if not chat_template:
        return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    require_chat_template(tokenizer)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
