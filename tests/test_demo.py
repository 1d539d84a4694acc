"""The demo's problem generator: answers are right, and test questions never occur in training."""

import re

from peftlab.demo import make_problems


def test_worked_answers_are_correct_and_test_questions_are_unseen():
    train, test = make_problems(300, 100, seed=3)
    assert len(train) == 300 and len(test) == 100
    assert not {p.question for p in train} & {p.question for p in test}
    for problem in train + test:
        for step in problem.work.split(", "):
            left, right = step.split(" = ")
            assert eval(left) == int(right)  # noqa: S307 - our own generated arithmetic
        assert int(re.findall(r"-?\d+", problem.work)[-1]) == problem.answer


def test_problems_are_reproducible_from_the_seed():
    assert make_problems(20, 5, seed=1) == make_problems(20, 5, seed=1)
