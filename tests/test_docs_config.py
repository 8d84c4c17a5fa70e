"""Every key in conf/ has a comment: the docs' configuration reference (docs/gen/config_reference.py)
shows it beside the key's default, so a key without one would be a blank in the reference."""

from __future__ import annotations

from pipeline import confdocs


def test_every_config_key_has_a_comment():
    problems = confdocs.undocumented()
    assert not problems, "config keys without a comment (the rule: pipeline/confdocs.py):\n" + "\n".join(problems)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_an_undocumented_key_is_named_with_its_file_and_line(tmp_path):
    conf = tmp_path / "conf"
    write(conf / "config.yaml", "# the run\ndefaults:\n  - model: small\n  - _self_\n"
                                "seed: 0  # randomness\n# where it runs\ndevice: cpu\nbatch_size: 16\n")
    write(conf / "model" / "small.yaml", "# a small model, described by the file's header\nname: small\n"
                                         "processing:\n  fold_ln: true  # fold the norms\n")
    write(conf / "model" / "big.yaml", "# a big model\nname: big  # the hub name\nprocessing:\n  fold_ln: false\n  extra: 1\n")
    write(conf / "experiment" / "night.yaml", "# @package _global_\n# a preset\nseed: 3\n"
                                              "hydra:\n  sweeper:\n    params:\n      seed: 1,2\n")
    problems = confdocs.undocumented(conf)
    assert [p.split(": `")[0] for p in problems] == ["conf/config.yaml:8", "conf/experiment/night.yaml:7",
                                                     "conf/model/big.yaml:5"]
    assert "`batch_size` has no comment" in problems[0] and "`hydra.sweeper.params.seed`" in problems[1]
    assert "`model.processing.extra`" in problems[2]  # model.name and fold_ln are documented by another option

    opts = confdocs.options(conf)
    assert [(o.group, o.name) for o in opts] == [("", "config"), ("experiment", "night"), ("model", "small"), ("model", "big")]
    assert opts[2].description == "a small model, described by the file's header"  # not its first key's comment
    assert {k.path: k.comment for k in opts[0].keys} == {"seed": "randomness", "device": "where it runs", "batch_size": ""}
    assert confdocs.key_comments(opts)["model.name"] == "the hub name"
