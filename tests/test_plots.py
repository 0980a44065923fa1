"""Figures: each plot command writes a non-empty PNG."""

from minformer import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_positions_writes_four_pngs(tmp_path, capsys):
    assert cli.main(["plot", "positions", "--out", str(tmp_path)]) == 0

    names = sorted(path.name for path in tmp_path.glob("*.png"))
    assert names == ["positions_alibi.png", "positions_rope.png", "positions_sinusoidal.png", "positions_t5_buckets.png"]
    for path in tmp_path.glob("*.png"):
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_attention_draws_run_maps(trained_run, tiny_env, tmp_path, capsys):
    run_dir, _ = trained_run
    out = tmp_path / "attention.png"

    assert cli.main(["plot", "attention", str(run_dir), "--text", "The king.", "--out", str(out)]) == 0

    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_attention_without_text_is_an_error(trained_run, tiny_env, capsys):
    run_dir, _ = trained_run

    assert cli.main(["plot", "attention", str(run_dir)]) == 2
    assert "--text" in capsys.readouterr().err
