"""The demo's held-out problems: none occurs in the training data, prompted as in training."""
from l2d.data import DataSource, reasoning_gym_dataset
from l2d.demo import SYSTEM_PROMPT, heldout_task

KW = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=["+", "-"], allow_negation=False)


def test_heldout_problems_never_occur_in_training():
    source = DataSource(name="rg:basic_arithmetic", n=300, seed=0, generator_kwargs=KW)
    train_q = set(reasoning_gym_dataset("basic_arithmetic", 300, seed=0, **KW)["prompt"])
    task, removed = heldout_task(source, 40, seed=1_000_003, train_questions=train_q)
    assert len(task) == 40
    questions = [ex.messages[-1]["content"] for ex in task.examples]
    assert not set(questions) & train_q
    assert all(ex.messages[0] == {"role": "system", "content": SYSTEM_PROMPT} for ex in task.examples)
    # Scoring still uses the generator's own answers: the gold answer is judged correct.
    assert all(task.score(ex, ex.gold) for ex in task.examples)
    # Against itself, every problem is "seen": all removed.
    same, removed_all = heldout_task(source, 10, seed=0, train_questions=set(
        reasoning_gym_dataset("basic_arithmetic", 20, seed=0, **KW)["prompt"]))
    assert removed_all >= 20 and len(same) <= 10
