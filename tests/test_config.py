import pytest

from stardomain.config import Config, load_config, parse_override
from stardomain.errors import UserError


def test_minimal_file_gets_the_default_recipe(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {name: digits}\nmodel: {name: mlp, kwargs: {width: 8}}\n")
    cfg = load_config(p)
    assert cfg.train == Config().train and cfg.model.kwargs == {"width": 8}


def test_dotted_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(None, ["train.epochs=5", "train.optimizer.lr=0.1", "model.kwargs.width=32",
                             "train.optimizer.nesterov=true", "train.schedule.step_epochs=[2, 4]"])
    assert cfg.train.epochs == 5 and cfg.train.optimizer.lr == 0.1 and cfg.model.kwargs["width"] == 32
    assert cfg.train.optimizer.nesterov is True and cfg.train.schedule.step_epochs == [2, 4]
    assert parse_override("a.b=hello") == (["a", "b"], "hello")


@pytest.mark.parametrize("override,needle", [
    ("train.optimizer.name=sgdd", "train.optimizer.name"),
    ("train.epochs=0", "train.epochs"),
    ("train.epocs=3", "train.epocs"),
    ("trian.epochs=3", "trian"),
])
def test_invalid_values_name_the_field(override, needle):
    with pytest.raises(UserError, match=needle):
        load_config(None, [override])


def test_accepted_values_are_listed():
    with pytest.raises(UserError, match="'sgd', 'adam' or 'adamw'"):
        load_config(None, ["train.optimizer.name=rmsprop"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["nonsense"])


def test_repo_mnist_config_is_the_papers_mlp():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "mnist_mlp.yaml")
    assert cfg.data.name == "mnist" and cfg.model.name == "mlp"
    assert cfg.model.kwargs.get("width") == 16 and cfg.model.kwargs.get("depth", 1) == 1
