import pytest

from certdist.training.schedules import linear_decay, lr_at, scale_schedule, smooth_eps


def test_smooth_eps_shape():
    eps, start, ramp = 0.2, 100, 400
    vals = [smooth_eps(s, eps, start, ramp) for s in range(0, 700)]
    assert all(v == 0 for v in vals[:start + 1])
    assert vals[start + ramp] == pytest.approx(eps) and vals[-1] == pytest.approx(eps)
    assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:])), "monotone"
    assert max(vals) <= eps + 1e-12
    mid = start + ramp // 4
    # polynomial part lies below the straight line; linear part has constant slope
    assert vals[mid - 50] < eps * (mid - 50 - start) / ramp
    d1 = vals[mid + 101] - vals[mid + 100]
    d2 = vals[mid + 201] - vals[mid + 200]
    assert d1 == pytest.approx(d2, rel=1e-6)
    # slopes match at the switch point
    left = vals[mid] - vals[mid - 1]
    assert left == pytest.approx(d1, rel=0.05)


def test_smooth_eps_edge_cases():
    assert smooth_eps(5, 0.1, 10, 0) == 0.0
    assert smooth_eps(10, 0.1, 10, 0) == 0.1
    assert smooth_eps(12, 0.1, 10, 2) == 0.1
    assert 0 < smooth_eps(11, 0.1, 10, 2) < 0.1


def test_lr_and_linear_decay():
    assert lr_at(0, 1.0, (8, 9), 0.2) == 1.0
    assert lr_at(8, 1.0, (8, 9), 0.2) == pytest.approx(0.2)
    assert lr_at(9, 1.0, (8, 9), 0.2) == pytest.approx(0.04)
    assert linear_decay(0, 1.0, 0.0, 10, 110) == 1.0
    assert linear_decay(60, 1.0, 0.0, 10, 110) == pytest.approx(0.5)
    assert linear_decay(200, 1.0, 0.0, 10, 110) == 0.0


def test_distill_weight():
    from certdist.training.schedules import distill_weight
    assert [distill_weight(s, "constant", 10, 20) for s in (0, 15, 20)] == [1.0, 1.0, 1.0]
    assert [distill_weight(s, "late", 10, 20) for s in (0, 9, 10, 19)] == [0.0, 0.0, 1.0, 1.0]
    assert [distill_weight(s, "decay", 10, 20) for s in (0, 10, 15, 20)] == [1.0, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="unknown beta schedule"):
        distill_weight(0, "foo", 1, 2)


def test_scale_schedule_keeps_the_proportions_and_fits_in_the_epochs():
    assert scale_schedule(1, 5, (8, 9), 10, 10) == (1, 5, (8, 9))
    assert scale_schedule(1, 5, (8, 9), 10, 3) == (0, 2, (2,))
    assert scale_schedule(1, 5, (8, 9), 10, 20) == (2, 10, (16, 18))
    assert scale_schedule(0, 20, (50, 60), 70, 7) == (0, 2, (5, 6))
    assert scale_schedule(0, 0, (8, 9), 10, 5) == (0, 0, (4,))  # no ramp stays none
    for ref in (10, 70, 160):
        for epochs in range(1, 40):
            w, r, ms = scale_schedule(1, ref // 2, (int(0.8 * ref), int(0.9 * ref)), ref, epochs)
            assert r >= 1 and w + r <= epochs and w < epochs
            assert all(0 <= m < epochs for m in ms) and list(ms) == sorted(ms)
