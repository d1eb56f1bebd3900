"""The CLI called in process, as the console script calls it: fast enough for many hostile cases."""

import sys


def run_cli(monkeypatch, capsys, *args, env=None) -> tuple[int, str, str]:
    """stardomain.cli.main with argv `args` -> (exit code, stdout, stderr); success returns 0."""
    from stardomain import cli

    monkeypatch.setattr(sys, "argv", ["stardomain", *map(str, args)])
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    for k in env or {}:
        monkeypatch.delenv(k)
    return code, out, err


def refuse_training(monkeypatch, why: str) -> None:
    """Make every way of training a model fail the test with `why`: the solo loop, a stacked population's
    epoch and Starlight (a study trains through the population when it stacks, not through `fit`)."""
    import stardomain.population as population
    import stardomain.starlight as starlight
    import stardomain.training as training

    def refuse(*_a, **_k):
        raise AssertionError(why)

    monkeypatch.setattr(training, "fit", refuse)
    monkeypatch.setattr(population, "_epoch", refuse)
    monkeypatch.setattr(starlight, "fit", refuse)
