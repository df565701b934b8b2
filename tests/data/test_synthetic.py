"""Synthetic verifiable tasks: answers, the carry-free mistake of the demo's student, reproducibility."""

import random

import pytest

from megatron_opd.data.synthetic import ArithmeticTask, carry_free_sum, make_samples


def test_carry_free_sum_is_digitwise_addition_mod_10():
    assert carry_free_sum(37, 48) == "75"  # 7+8=15 -> 5, 3+4 -> 7
    assert carry_free_sum(95, 17) == "2"  # 5+7 -> 2, 9+1 -> 0 (leading zero dropped)
    assert carry_free_sum(12, 34) == "46"  # no carry: the true sum
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        expected = int("".join(str((int(x) + int(y)) % 10)
                               for x, y in zip(f"{a:04d}", f"{b:04d}")))
        assert carry_free_sum(a, b) == str(expected)
        # the mistake changes the answer exactly when some digit column carries
        carries = any(int(x) + int(y) >= 10 for x, y in zip(f"{a:04d}", f"{b:04d}"))
        assert (carry_free_sum(a, b) != str(a + b)) == carries
    with pytest.raises(ValueError, match="non-negative"):
        carry_free_sum(-1, 3)


def test_solutions_are_correct_unless_carries_are_dropped():
    task = ArithmeticTask(digits=2, ops="+*")
    samples = task.samples(50, seed=3)
    assert samples == task.samples(50, seed=3)  # seeded
    for s in samples:
        assert task.solution(s).endswith(f"\\boxed{{{int(eval(str(s['a']) + s['op'] + str(s['b'])))}}}")
        flawed = task.solution(s, drop_carries=True)
        if s["op"] == "+":
            assert flawed.endswith(f"\\boxed{{{carry_free_sum(s['a'], s['b'])}}}")
        else:
            assert flawed == task.solution(s)  # only addition has the carry mistake


def test_bad_task_arguments_name_the_field():
    with pytest.raises(ValueError, match="digits"):
        ArithmeticTask(digits=0)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops="/")
    with pytest.raises(ValueError, match="'arithmetic', 'string', 'mixed'"):
        make_samples("poetry", 3)


def test_string_task_its_mistake_and_the_mixed_kind():
    from megatron_opd.data.synthetic import StringTask, worked_solution
    from megatron_opd.rewards.synthetic import boxed_match_reward

    strings = make_samples("string", 6, seed=5)
    assert strings == StringTask().samples(6, seed=5) and all(s["domain"] == "code" for s in strings)
    for s in strings:
        word = s["prompt"].removeprefix("Reverse ").removesuffix(".")
        assert s["answer"] == word[::-1]
        assert boxed_match_reward(worked_solution(s), s["answer"]) == 1.0
        wrong = worked_solution(s, mistake=True)  # copied, not reversed
        assert wrong.endswith(f"\\boxed{{{word}}}")
        assert boxed_match_reward(wrong, s["answer"]) == float(word == word[::-1])
    # mixed: the same problems as each kind draws with this seed, alternating (what lets a domain
    # teacher's held-out set contain the mixed held-out set's prompts of its domain)
    mixed = make_samples("mixed", 7, seed=5)
    assert mixed[1::2] == make_samples("string", 3, seed=5)
    assert mixed[0::2] == make_samples("arithmetic", 4, seed=5)
    math_s = mixed[0]
    assert worked_solution(math_s, mistake=True) == ArithmeticTask().solution(math_s, drop_carries=True)
