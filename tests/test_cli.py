"""The `deepmoe` command: dispatch, unknown commands, the preset table."""

import deepmoe as dm
from deepmoe import cli
from deepmoe.info import parameter_table


def test_unknown_command_lists_the_commands(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "info" in err


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    assert "doctor" in capsys.readouterr().out


def test_platform_flag_is_taken_out_anywhere():
    assert cli._pop_platform(["--steps", "3", "--platform", "cpu", "--out", "x"]) == ("cpu", ["--steps", "3",
                                                                                          "--out", "x"])
    assert cli._pop_platform(["--platform=ascend"]) == ("ascend", [])


def test_info_table_counts(capsys):
    assert cli.main(["info", "--preset", "v4-flash"]) == 0
    out = capsys.readouterr().out
    total, active = dm.count_params(dm.preset("v4-flash"))
    assert f"{total / 1e9:.2f}B" in out and f"{active / 1e9:.2f}B" in out
    assert "v4-pro" in parameter_table()
