"""A sampler with written answers, for tests that must know what the model said."""

from dsv32.eval.sample import Sample


class Scripted:
    """Answers each task with given completions and remembers which tasks it was asked for.
    `texts`: {task id: completions}, or one list of completions for every task; a completion is
    its text (finished by "stop") or (text, finish_reason). The first n are returned."""

    def __init__(self, texts):
        self.texts, self.asked = texts, []

    def sample(self, tasks, cfg, progress=None):
        for t in tasks:
            self.asked.append(t.id)
            given = self.texts[t.id] if isinstance(self.texts, dict) else self.texts
            pairs = [(x, "stop") if isinstance(x, str) else x for x in given[:cfg.n]]
            yield t, [Sample(text, reason, len(text)) for text, reason in pairs]
