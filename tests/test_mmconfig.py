"""Micro-Manager .cfg checker: real configs from ../shared/data/mm_configs, no hardware."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from livestain.devices.mmconfig import (
    KNOWN_COMMANDS,
    ConfigReport,
    check_config,
    missing_adapters,
)

MM_CONFIGS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mm_configs"


@pytest.fixture(scope="module")
def mm_configs() -> Path:
    """The shared real configs; tests that need them skip cleanly without them."""
    if not MM_CONFIGS.is_dir():
        pytest.skip(f"shared config folder {MM_CONFIGS} is absent (livestain dev setup only)")
    return MM_CONFIGS


def _cfg(mm_configs: Path, name: str) -> Path:
    found = sorted(mm_configs.rglob(name))
    if not found:
        pytest.skip(f"{name} is not in {mm_configs}")
    return found[0]


def _write(tmp_path: Path, text: str, name: str = "scope.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ every shared file


def test_every_shared_cfg_parses_and_summarises(mm_configs: Path) -> None:
    paths = sorted(mm_configs.rglob("*.cfg"))
    assert len(paths) >= 19
    for path in paths:
        report = check_config(path)
        assert isinstance(report, ConfigReport)
        assert report.path == path
        assert report.format in ("current", "legacy")
        assert report.devices, path
        assert report.adapter_libraries == sorted({d.library for d in report.devices})
        lines = report.summary_lines()
        assert lines[0].startswith(f"{path.name}: {report.format} format")
        assert any(line.strip().startswith("cameras:") for line in lines)
        assert report.ready == (not report.problems)
        assert any("ready for livestain" in line for line in lines) == report.ready


def test_agrees_with_pymmcore_plus_model_on_every_shared_cfg(mm_configs: Path) -> None:
    """Devices, groups, presets and pixel sizes match pymmcore-plus's own cfg model."""
    from pymmcore_plus.model import Microscope

    for path in sorted(mm_configs.rglob("*.cfg")):
        report = check_config(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scope = Microscope.create_from_config(str(path))
        assert report.devices == [(d.name, d.library, d.adapter_name) for d in scope.devices], path
        assert report.config_groups == {
            name: list(group.presets) for name, group in scope.config_groups.items()
        }, path
        assert report.pixel_sizes == {
            name: p.pixel_size_um for name, p in scope.pixel_size_group.presets.items()
        }, path


def test_formats_of_shared_files(mm_configs: Path) -> None:
    legacy = {p.name for p in mm_configs.rglob("*.cfg") if check_config(p).format == "legacy"}
    assert {"MMConfig_ham_x64.cfg", "MMConfig_NikonTE2000.cfg", "aotf.cfg"} <= legacy
    for current in ("MMConfig_demo_bindist.cfg", "mantis-V2.cfg", "TofraConfig-UCSF.cfg"):
        assert current not in legacy


# ------------------------------------------------------------------ specific files


def test_demo_config(mm_configs: Path) -> None:
    r = check_config(_cfg(mm_configs, "MMConfig_demo_bindist.cfg"))
    assert r.format == "current"
    assert len(r.devices) == 13
    assert r.devices[1] == ("Camera", "DemoCamera", "DCam")
    assert r.adapter_libraries == ["DemoCamera", "Utilities"]
    assert r.cameras == ["Camera"]
    assert r.focus_devices == ["Z"]
    assert r.xy_stages == ["XY"]
    assert r.shutters == ["White Light Shutter", "LED Shutter"]
    assert r.core_roles == {
        "Camera": "Camera",
        "Shutter": "White Light Shutter",
        "Focus": "Z",
    }
    assert r.channel_group == "Channel"
    assert r.config_groups["Channel"] == ["FITC", "Rhodamine", "DAPI", "Cy5"]
    assert list(r.config_groups) == [
        "Camera", "Objective", "Channel", "Channel-Multiband", "System", "LightPath",
    ]
    assert r.pixel_sizes == {"Res20x": 0.5, "Res40x": 0.25, "Res10x": 1.0}
    # The demo's Channel group is all fluorescence: nothing for livestain to predict from.
    assert r.brightfield_presets == []
    assert len(r.problems) == 1
    assert "no brightfield preset" in r.problems[0]
    assert "FITC, Rhodamine, DAPI, Cy5" in r.problems[0]
    summary = r.summary_lines()
    assert "  cameras:       Camera (Core Camera)" in summary
    assert "  focus (Z):     Z (Core Focus)" in summary
    assert "  channel group: Channel: FITC, Rhodamine, DAPI, Cy5 (brightfield: none)" in summary
    assert "  pixel size:    Res20x 0.5 um, Res40x 0.25 um, Res10x 1 um" in summary
    assert not any("ready for livestain" in line for line in summary)


def test_legacy_zeiss_hamamatsu_config(mm_configs: Path) -> None:
    r = check_config(_cfg(mm_configs, "MMConfig_ham_x64.cfg"))  # CRLF line endings
    assert r.format == "legacy"
    assert [d.label for d in r.devices] == [
        "CAM", "DemoCAM", "FilterCube", "HalogenLamp", "Objective", "Shutter", "Sideport",
        "Stand", "Z",
    ]
    assert r.devices[0] == ("CAM", "Hamamatsu", "Hamamatsu_DCAM")
    assert r.adapter_libraries == ["DemoCamera", "Hamamatsu", "ZeissMTB"]
    assert r.cameras == ["CAM", "DemoCAM"]
    assert r.focus_devices == ["Z"]
    assert r.xy_stages == []
    # The Transmitted preset makes the halogen lamp the shutter.
    assert r.shutters == ["HalogenLamp", "Shutter"]
    assert r.channel_group == "Channel"
    assert r.config_groups["Channel"] == ["DAPI", "FITC", "Transmitted", "TxR"]
    assert r.brightfield_presets == ["Transmitted"]
    assert r.pixel_sizes == {}
    assert r.problems[0].startswith("lines 24-26: Label for device 'Baseport'")
    assert r.problems[1].startswith("lines 70-71: 'ImageSynchro'")
    assert r.problems[2].startswith("no pixel size calibration")
    assert len(r.problems) == 3


def test_legacy_equipment_lines_are_problems(mm_configs: Path) -> None:
    r = check_config(_cfg(mm_configs, "MMConfig_andor_cascade.cfg"))
    assert r.format == "legacy"
    assert r.problems[0].startswith("lines 16-17: 'Equipment'")
    assert r.cameras == ["Andor", "Cascade"]
    assert r.core_roles["Camera"] == "Andor"
    assert r.focus_devices == ["Z"]  # X and Y are single-axis DStages, not focus


def test_mantis_biohub_config(mm_configs: Path) -> None:
    r = check_config(_cfg(mm_configs, "mantis-V2.cfg"))
    assert r.format == "current"
    assert len(r.devices) == 27
    assert ("Prime BSI Express", "PVCAM", "Camera-1") in r.devices
    assert r.adapter_libraries == [
        "ASITiger", "NikonTi2", "PVCAM", "SerialManager", "SpinnakerCamera", "SutterLambda2",
        "TriggerScopeMM", "Utilities",
    ]
    assert r.cameras == ["Blackfly Epi", "Prime BSI Express"]
    assert r.focus_devices == ["PiezoStage:Q:35", "ZDrive", "PFSOffset", "AP Galvo", "IP Galvo"]
    assert r.xy_stages == ["XYStage:XY:31"]
    assert r.shutters == ["Turret1Shutter", "TS2 Shutter"]
    assert r.core_roles == {"Shutter": "Turret1Shutter", "Focus": "PiezoStage:Q:35"}
    assert list(r.config_groups) == [
        "Imaging Path", "Channels - Left", "Channels - Right", "System",
    ]
    assert r.config_groups["Channels - Right"] == [
        "GFP EX488 EM525-45", "mCherry EX561 EM600-37", "Cy5 EX639 EM698-70", "BF - Oblique",
    ]
    assert r.pixel_sizes == {"Right": 0.1133, "Left": 0.0345}
    # Two channel groups, none chosen: the one thing between mantis and livestain.
    assert r.channel_group is None
    assert len(r.problems) == 1
    assert "'Channels - Left', 'Channels - Right'" in r.problems[0]
    assert any("Imaging Path/Right, Imaging Path/Left switch it" in n for n in r.notes)


def test_replay_camera_is_a_python_device(mm_configs: Path) -> None:
    r = check_config(_cfg(mm_configs, "MMConfig_A549_fov_replay.cfg"))
    assert [tuple(d) for d in r.python_devices] == [
        ("Camera", "shrimpy.replay_camera", "ReplayCamera")
    ]
    assert "Camera" not in [d.label for d in r.devices]
    assert r.cameras == ["Camera"]
    assert r.focus_devices == ["ObjectiveZ", "PiezoZ"]
    assert r.core_roles["Focus"] == "PiezoZ"
    assert r.channel_group == "Channel"
    assert r.brightfield_presets == ["BF - Oblique"]
    assert r.pixel_sizes["Res10x"] == pytest.approx(0.1133)
    assert r.problems == [
        "Core Camera 'Camera' is a pymmcore-plus Python device "
        "(shrimpy.replay_camera.ReplayCamera, a '#py' line): only UniMMCore loads it, "
        "livestain's CMMCorePlus does not"
    ]


def test_squid_crlf_config(mm_configs: Path) -> None:
    r = check_config(_cfg(mm_configs, "Squid_Oryx_Linux.cfg"))
    assert r.cameras == ["Oryx"]
    assert r.focus_devices == ["ZStage"]
    assert r.xy_stages == ["XYStage"]
    assert r.shutters == ["CephlaShutter"]
    assert r.devices[0] == ("/dev/ttyACM0", "SerialManager", "/dev/ttyACM0")
    assert r.channel_group is None
    assert r.config_groups == {"System": ["Startup"]}


# ------------------------------------------------------------------ synthetic files

READY = """\
# Generated by Configurator on Mon Jan 01 00:00:00 2024
Property,Core,Initialize,0
Device,Cam,DemoCamera,DCam
Device,Focus,DemoCamera,DStage
Device,Stage,DemoCamera,DXYStage
Device,Shutter,DemoCamera,DShutter
Device,Path,DemoCamera,DLightPath
Property,Core,Initialize,1
FocusDirection,Focus,0
Property,Core,Camera,Cam
Property,Core,Shutter,Shutter
Property,Core,Focus,Focus
Label,Path,0,Brightfield
Label,Path,1,GFP
ConfigGroup,Channel,Brightfield,Path,Label,Brightfield
ConfigGroup,Channel,GFP,Path,Label,GFP
ConfigPixelSize,Res10x,Core,Camera,Cam
PixelSize_um,Res10x,0.65
"""


def test_complete_config_is_ready(tmp_path: Path) -> None:
    r = check_config(_write(tmp_path, READY))
    assert r.problems == []
    assert r.ready
    assert r.channel_group == "Channel"
    assert r.brightfield_presets == ["Brightfield"]
    assert r.pixel_sizes == {"Res10x": 0.65}
    assert r.focus_devices == ["Focus"]
    assert r.xy_stages == ["Stage"]
    assert "  ready for livestain (once the adapters above are installed)" in r.summary_lines()


def test_missing_essentials_are_problems(tmp_path: Path) -> None:
    text = (
        "Property,Core,Initialize,0\nDevice,Port,SerialManager,COM1\nProperty,Core,Initialize,1\n"
    )
    r = check_config(_write(tmp_path, text))
    assert r.problems == [
        "no channel group: livestain needs a config group whose presets switch "
        "brightfield/fluorescence (Micro-Manager's 'Channel' group)",
        "no camera",
        "no focus device: livestain acquires z-stacks and needs a Z stage (Core Focus)",
        "no pixel size calibration: livestain stores voxel sizes from Micro-Manager's pixel "
        "size (1 um if uncalibrated) and the model expects the real scale; add "
        "ConfigPixelSize/PixelSize_um lines",
    ]


def test_channel_group_from_startup_preset_and_plan_note(tmp_path: Path) -> None:
    text = READY.replace("ConfigGroup,Channel,", "ConfigGroup,Light,") + (
        "ConfigGroup,System,Startup,Core,ChannelGroup,Light\n"
    )
    r = check_config(_write(tmp_path, text))
    assert r.channel_group == "Light"
    assert r.problems == []
    assert any("channels: [{group: 'Light', config: ...}]" in n for n in r.notes)


def test_legacy_configuration_lines(tmp_path: Path) -> None:
    text = (
        "# Unload all devices\nProperty,Core,Initialize,0\nDevice,Cam,DemoCamera,DCam\n"
        "Configuration,Fast,Cam,Binning,2\nConfig,Slow,Cam,Binning,1\nConfig,Bad,Cam,Binning\n"
    )
    r = check_config(_write(tmp_path, text))
    assert r.format == "legacy"
    assert r.config_groups["(global configurations)"] == ["Fast", "Slow"]
    assert r.notes[0].startswith("line 4: 'Configuration' (pre-2008 global configuration)")
    assert r.notes[1].startswith("line 5: 'Config' (pre-2008 global configuration)")
    assert r.problems[0].startswith("line 6: Config line with 4 fields (Micro-Manager needs 5)")


# ------------------------------------------------------------------ not a config at all


def test_binary_file_raises_naming_path_line_and_content(tmp_path: Path) -> None:
    path = tmp_path / "image.cfg"
    path.write_bytes(b"# fine\nDevice,Cam,DemoCamera,DCam\n\x89PNG\x00\x01\x02junk\n")
    with pytest.raises(ValueError) as err:
        check_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "line 3" in msg
    assert "PNG" in msg


def test_text_that_is_not_a_config_raises_naming_first_bad_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "# a python file\nimport os\nprint(os.getcwd())\n", "script.cfg")
    with pytest.raises(ValueError, match=r"script\.cfg.*line 2: 'import os'"):
        check_config(path)


def test_empty_or_comment_only_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"empty\.cfg.*no commands"):
        check_config(_write(tmp_path, "# nothing here\n\n", "empty.cfg"))


def test_a_stray_unknown_line_is_only_a_note(tmp_path: Path) -> None:
    r = check_config(_write(tmp_path, READY + "Frobnicate,1\n"))
    assert r.problems == []
    assert r.notes[0] == "line 19: unknown command 'Frobnicate' (Micro-Manager skips the line)"


# ------------------------------------------------------------------ adapters


def test_missing_adapters(mm_configs: Path) -> None:
    demo = check_config(_cfg(mm_configs, "MMConfig_demo_bindist.cfg"))
    assert missing_adapters(demo, {"DemoCamera"}) == ["Utilities"]
    assert missing_adapters(demo, {"mmgr_dal_DemoCamera", "Utilities"}) == []
    assert missing_adapters(demo, set()) == ["DemoCamera", "Utilities"]
    mantis = check_config(_cfg(mm_configs, "mantis-V2.cfg"))
    assert missing_adapters(mantis, {"DemoCamera", "Utilities", "SerialManager"}) == [
        "ASITiger", "NikonTi2", "PVCAM", "SpinnakerCamera", "SutterLambda2", "TriggerScopeMM",
    ]


def test_missing_adapters_is_case_sensitive(tmp_path: Path) -> None:
    r = check_config(_write(tmp_path, READY.replace("DemoCamera,DCam", "Democamera,DCam")))
    assert missing_adapters(r, {"DemoCamera"}) == ["Democamera"]
    assert any("'Democamera' is spelled 'DemoCamera'" in n for n in r.notes)


# ------------------------------------------------------------------ against real MMCore

#: Lines that need no adapter. Each is preceded by a valid line, so it is line 2.
REFUSED = [
    "Equipment,Nikon 10X S Fluor,Magnification,10",
    "ImageSynchro,Z",
    "Config,Fast,Core,AutoShutter",
    "Label,Baseport,0,BP",
    "Property,Nowhere,Port,COM1",
    "Property,Core,Focus,Z",
    "Property,Core,ChannelGroup,Nope",
    "PixelSize_um,Res,0.5",
    "ConfigGroup,Channel,DAPI",
    "Property,Core,AutoShutter,1,2",
    "Delay,Lamp,100",
    "Parent,Z,Hub",
    "ConfigPixelSize,Res,Core,AutoShutter,",  # 4 fields: MMCore drops empty ones
]
ACCEPTED = [
    "ConfigGroup,Channel,Brightfield,Core,AutoShutter,1",
    "ConfigGroup,Empty",
    "ConfigGroup,Channel,GFP,Core,AutoShutter,",
    "ConfigGroup,Channel,,DIC,Core,AutoShutter,1",  # empty fields dropped: 6 fields
    "Property,Core,ChannelGroup,Channel",
    "FocusDirection,Z,0",
    "ConfigPixelSize,Res10x,Core,AutoShutter,1",
    "PixelSize_um,Res10x,0.65",
    "Configuration,Old,Core,AutoShutter,1",
    "Config,Fast,Core,AutoShutter,1",
    "Property,Core,TimeoutMs,20000",
    " Property,Nowhere,Port,COM1",  # not a command with the space: skipped
]


def _mmcore_refuses(path: Path) -> str | None:
    import pymmcore

    core = pymmcore.CMMCore()
    try:
        core.loadSystemConfiguration(str(path))
    except (RuntimeError, OSError) as e:  # pymmcore raises CMMError as OSError
        return str(e)
    return None


@pytest.mark.parametrize("line", REFUSED)
def test_refused_lines_agree_with_mmcore(tmp_path: Path, line: str) -> None:
    path = _write(tmp_path, f"Property,Core,AutoShutter,1\n{line}\n")
    refused = _mmcore_refuses(path)
    assert refused is not None and refused.startswith("Line 2:"), refused
    r = check_config(path)
    assert any(p.startswith("line 2: ") for p in r.problems), r.problems


def test_accepted_lines_agree_with_mmcore(tmp_path: Path) -> None:
    path = _write(tmp_path, "\n".join(["Property,Core,AutoShutter,1", *ACCEPTED]) + "\n")
    assert _mmcore_refuses(path) is None
    r = check_config(path)
    assert not [p for p in r.problems if p.startswith("line")], r.problems


def test_startup_preset_with_unloaded_device_agrees_with_mmcore(tmp_path: Path) -> None:
    text = "Property,Core,AutoShutter,1\nConfigGroup,System,Startup,Lamp,State,1\n"
    path = _write(tmp_path, text)
    assert 'No device with label "Lamp"' in (_mmcore_refuses(path) or "")
    r = check_config(path)
    assert r.problems[0].startswith("line 2: preset System/Startup sets device 'Lamp'")


def test_known_commands_cover_pymmcore_plus_vocabulary() -> None:
    from pymmcore_plus import CFGCommand

    names = {c.value for c in CFGCommand if c is not CFGCommand.FieldDelimiters}
    assert names <= KNOWN_COMMANDS
