"""The CPU demo (configs/demo.py), reduced: a tiny UniFormerV2 learns the direction of motion.

A single frame carries no class information (tests/test_data_synthetic.py), so chance (25%)
is the best any single-frame model can do; the assertion needs real temporal modelling.
"""
import json
import os


def test_reduced_demo_learns_motion(tmp_path):
    from configs import demo
    from uniformerv2_jax.training.loop import train_and_evaluate

    c = demo.get_config()
    c.dataset.data_dir = str(tmp_path / "data")
    c.dataset.num_train, c.dataset.num_val = 256, 64
    # 8 steps/epoch: the full demo's 240 steps and schedule on half the videos, one evaluation.
    c.train.update(epochs=30, eval_every_epochs=30, checkpoint_every_steps=1000,
                   log_every_steps=40)
    summary = train_and_evaluate(c, str(tmp_path / "work"))
    assert summary["steps"] == 240
    assert summary["final_top1"] >= 0.6, summary["history"]
    with open(tmp_path / "work" / "summary.json") as f:
        assert json.load(f)["best_top1"] == summary["best_top1"]
    assert os.listdir(tmp_path / "work" / "tensorboard")
