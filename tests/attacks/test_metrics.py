import numpy as np
import pytest

from privdiff.attacks.metrics import attack_metrics, save_roc_plot


def test_identical_distributions_give_auc_near_half():
    rng = np.random.default_rng(0)
    m = attack_metrics(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(m["auc"] - 0.5) < 0.03 and m["asr"] < 0.54
    assert m["tpr_at_1pct_fpr"] < 0.03  # ~ the FPR itself


def test_separated_distributions_give_auc_near_one():
    rng = np.random.default_rng(1)
    m = attack_metrics(rng.normal(8, 1, size=500), rng.normal(0, 1, size=500))
    assert m["auc"] > 0.999 and m["asr"] > 0.99 and m["tpr_at_1pct_fpr"] > 0.99
    flipped = attack_metrics(rng.normal(0, 1, size=500), rng.normal(8, 1, size=500))
    assert flipped["auc"] < 0.001  # the direction is kept, not folded


def test_tpr_at_fpr_on_a_hand_made_case():
    members = np.array([999.5, 998.5, 997.5, 500, 400, 300, 200, 100, 50, 10])
    # 100 non-members 0..99 scaled: the top one (99*10=990) is below 997.5; make exactly one above 998.5
    nonmembers = np.arange(1000.0)  # 0 .. 999: one non-member (999) above 998.5
    m = attack_metrics(members, nonmembers)
    # FPR <= 1%: at most 10 non-members above the threshold -> threshold > 989 -> members 999.5, 998.5, 997.5
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.3)
    # FPR <= 0.1%: at most 1 non-member (999) above -> threshold in (998, 998.5] -> members 999.5, 998.5
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(0.2)
    assert m["n_members"] == 10 and m["n_nonmembers"] == 1000 and m["notes"] == []
    # with 100 non-members 0.1% FPR is not resolvable: reported as None with a note, not as a number
    small = attack_metrics(members / 10, np.arange(100.0))
    assert small["tpr_at_0.1pct_fpr"] is None and "not resolvable" in small["notes"][0]
    # FPR <= 1% with 100 non-members: only 99 may be above -> members 99.95, 99.85 (99.75 > 99 too) -> 0.3
    assert small["tpr_at_1pct_fpr"] == pytest.approx(0.3)


def test_asr_is_the_best_threshold_accuracy():
    m = attack_metrics(np.array([2.0, 3.0, 0.5]), np.array([0.0, 1.0, 4.0]))
    # best threshold in (1, 2]: 2 of 3 members and 2 of 3 non-members right
    assert m["asr"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        attack_metrics(np.array([np.nan]), np.array([0.0]))


def test_roc_plot_is_a_png(tmp_path):
    m = attack_metrics(np.arange(10.0), np.arange(10.0) - 3)
    path = save_roc_plot(tmp_path / "a.png", {"x": {**m["roc"], "auc": m["auc"]}}, title="t")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
