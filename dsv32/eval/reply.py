"""A completion's two parts: the reasoning, and the answer after `</think>`.

Every grader reads only the answer: the reasoning may try and discard anything. A thinking-mode
completion whose thinking never closed (the token budget ran out first) has no answer at all.
Kept apart from the graders so that light users (the RL proof reward) need none of their packages.
"""

from dsv32.chat import EOS, THINK_END

# what ends a reply in the text a sampler returns: V3.2's EOS, and the end-of-turn and end-of-text
# markers of the im_start/im_end format the converted family speaks (eval reaches that family only
# through the registry, so its markers are spelled here)
END_TOKENS = (EOS, "<|im_end|>", "<|endoftext|>")


def split_reply(text: str, thinking: bool) -> tuple[str, str | None]:
    """(reasoning, answer) of a completion; the answer is None when the thinking never closed.
    In chat mode the whole completion is the answer. A trailing end-of-reply token (END_TOKENS)
    is dropped."""
    for end in END_TOKENS:
        if text.endswith(end):
            text = text[:-len(end)]
            break
    if not thinking:
        return "", text
    reasoning, sep, answer = text.partition(THINK_END)
    return (reasoning, answer) if sep else (text, None)
