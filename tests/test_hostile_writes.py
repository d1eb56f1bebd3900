"""Never write what is not ours: every path a command writes (model files and their OUT.csv / OUT.state,
study folders and their lock, --json-out, plots) goes through one overwrite policy, checked before any work.
"""

from __future__ import annotations

import json
import os

import clitools
import pytest
import yaml

from stardomain.checkpoint import check_output, check_writable, sidecars
from stardomain.errors import UserError
from stardomain.study import check_study_folder, run_study
from stardomain.study.folder import MARK_NAME, MARK_TEXT, is_study_folder
from stardomain.study.lock import study_lock

TINY_SET = ["--set", "data.name=digits", "--set", "model.kwargs.width=8", "--set", "train.epochs=1",
            "--set", "train.batch_size=64"]
STUDY = {"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 4}},
         "train": {"epochs": 1, "batch_size": 128}, "star": {"align_every": "never"},
         "study": {"n_sources": 2, "n_heldouts": 1, "pairs": ["star_heldout", "regular_regular"],
                   "eval": {"points": 3, "align": False}, "bootstrap": 100}}


def run_cli(monkeypatch, capsys, *args):
    return clitools.run_cli(monkeypatch, capsys, *args)


def one_line(code, err, *words):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "internal error" not in err, err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def no_training(monkeypatch):
    clitools.refuse_training(monkeypatch, "training started before the outputs were checked")


# ---------------------------------------------------------------- the study lock

def test_a_lock_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    study = tmp_path / "study"
    study.mkdir()
    (study / ".lock").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        with study_lock(study):
            pass
    assert victim.read_text() == "precious"


def test_a_lock_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    os.mkfifo(study / ".lock")
    with pytest.raises(UserError, match="not a regular file"):
        with study_lock(study):
            pass


def test_run_with_a_planted_lock_link_empties_nothing(tmp_path, monkeypatch, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    study = tmp_path / "study"
    study.mkdir()
    (study / MARK_NAME).write_text(MARK_TEXT)
    (study / ".lock").symlink_to(victim)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(STUDY))
    code, _, err = run_cli(monkeypatch, capsys, "run", cfg, "--out", study)
    one_line(code, err, "symbolic link")
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------- files beside a model file

@pytest.mark.parametrize("out,beside", [("results", "results.csv"), ("m.safetensors", "m.safetensors.csv"),
                                        ("m.safetensors", "m.safetensors.state")])
def test_train_never_replaces_a_users_file_beside_its_output(tmp_path, monkeypatch, capsys, out, beside, no_training):
    mine = tmp_path / beside
    mine.write_text("the user's own file\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", tmp_path / out, *TINY_SET)
    one_line(code, err, beside, "--force")
    assert mine.read_text() == "the user's own file\n"


def test_star_never_replaces_a_users_csv(tmp_path):
    """`star` checks its outputs with the same function as `train` (cli.star: prepare_training_outputs)."""
    from stardomain.checkpoint import prepare_training_outputs

    mine = tmp_path / "star.safetensors.csv"
    mine.write_text("epoch;mine\n")
    with pytest.raises(UserError, match="star.safetensors.csv.*--force"):
        prepare_training_outputs(tmp_path / "star.safetensors", "star", {"role": "star"})
    assert mine.read_text() == "epoch;mine\n"


def test_a_truncated_state_says_delete_it_or_force_and_force_starts_afresh(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.safetensors"
    state = sidecars(out)["state"]
    state.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__meta")  # a state cut short
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, *TINY_SET)
    one_line(code, err, "delete it", "--force")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, "--force", *TINY_SET)
    assert code == 0, err
    assert out.is_file() and not state.exists()


def test_the_api_resume_of_a_truncated_state_says_what_to_do(tmp_path):
    from stardomain.checkpoint import load_state

    p = tmp_path / "x.state"
    p.write_bytes(b"\x05\x00")
    with pytest.raises(UserError, match="delete it .or pass --force. to start afresh"):
        load_state(p)


def test_a_history_csv_of_our_own_is_replaced_by_the_same_job(tmp_path):
    out = tmp_path / "m.safetensors"
    sidecars(out)["history.csv"].write_text("epoch,loss,acc\n1,0.5,0.9\n")
    check_output(sidecars(out)["history.csv"], "history.csv")  # ours: no complaint


# ---------------------------------------------------------------- study folders

def test_run_refuses_a_users_folder_that_merely_holds_a_results_json(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"my": "numbers"}')
    (mine / "report.md").write_text("# my report")
    (mine / "plan.json").write_text("{}")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(STUDY))
    code, _, err = run_cli(monkeypatch, capsys, "run", cfg, "--out", mine)
    one_line(code, err, "not a study folder", "--force")
    assert (mine / "results.json").read_text() == '{"my": "numbers"}'
    assert (mine / "report.md").read_text() == "# my report"
    assert not is_study_folder(mine)


def test_a_study_marks_its_folder_and_a_rerun_reuses_it(tmp_path):
    from stardomain.config import Config, validate

    out = tmp_path / "s"
    run_study(validate(Config, STUDY), out, progress=False, report=False)
    assert is_study_folder(out) and (out / MARK_NAME).is_file()
    check_study_folder(out)  # ours: no --force needed
    old = tmp_path / "old"  # a folder an earlier version wrote: a plan of a study's shape, no mark
    old.mkdir()
    (old / "plan.json").write_text(json.dumps(json.loads((out / "plan.json").read_text())))
    assert is_study_folder(old)


def test_a_corrupt_model_in_a_finished_study_is_reported_and_rebuilt(tmp_path, capsys):
    from stardomain.config import Config, validate

    out = tmp_path / "s"
    cfg = validate(Config, STUDY)
    first = run_study(cfg, out, progress=False, report=False)
    model = sorted((out / "models").glob("source*.safetensors"))[0]
    good = model.read_bytes()
    data = bytearray(good)
    data[-3] ^= 0x01  # one bit of one weight
    model.write_bytes(bytes(data))
    capsys.readouterr()
    again = run_study(cfg, out, progress=False, report=False)
    err = capsys.readouterr().err
    assert model.name in err and "rebuilding" in err, err
    assert model.read_bytes() == good  # rebuilt bit for bit
    assert again == first


# ---------------------------------------------------------------- writability before the work

def _unwritable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for d in (ro, "/proc", "/sys"):
        try:
            check_writable(os.path.join(d, "x"))
        except UserError:
            return d
    pytest.skip("no unwritable folder here")


def test_barrier_json_out_into_an_unwritable_place_fails_before_computing(tmp_path, monkeypatch, capsys):
    import stardomain.files as barriers

    def refuse(*_a, **_k):
        raise AssertionError("measured before checking --json-out")

    monkeypatch.setattr(barriers, "measure_files", refuse)
    ro = _unwritable(tmp_path)
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"")
    for option in ("--json-out", "--plot"):
        code, _, err = run_cli(monkeypatch, capsys, "barrier", a, a, option, f"{ro}/b.out")
        one_line(code, err, "cannot write", option)


def test_outputs_under_a_file_or_onto_a_fifo_are_refused(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        check_output(blocker / "sub" / "o.json", "barrier.json", option="--json-out")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        check_output(fifo, "barrier.json", option="--json-out", force=True)


def test_run_out_in_an_unwritable_place_is_refused_before_training(tmp_path, monkeypatch, capsys, no_training):
    ro = _unwritable(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(STUDY))
    code, _, err = run_cli(monkeypatch, capsys, "run", cfg, "--out", f"{ro}/study")
    one_line(code, err, "cannot write")
