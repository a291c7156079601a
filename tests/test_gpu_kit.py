"""The GPU kit's wheel slimmer: a wheel without the native libraries a CUDA 13 machine does not load, its RECORD
matching what is left, installable by pip."""

import subprocess
import sys
import zipfile

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "scripts"))

from slim_wheel import slim  # noqa: E402


def test_slim_wheel_keeps_the_named_libraries_and_a_matching_record(tmp_path):
    src = tmp_path / "in" / "demo_pkg-1.0-py3-none-any.whl"
    src.parent.mkdir()
    names = ["demo_pkg/__init__.py", "demo_pkg/libdemo_cuda130.so", "demo_pkg/libdemo_cuda124.so",
             "demo_pkg/libdemo_rocm64.so"]
    meta = "demo_pkg-1.0.dist-info/"
    with zipfile.ZipFile(src, "w") as z:
        for n in names:
            z.writestr(n, "VERSION = '1.0'\n" if n.endswith(".py") else b"\0" * 1000)
        z.writestr(meta + "METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
        z.writestr(meta + "WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(meta + "RECORD", "".join(f"{n},,\n" for n in [*names, meta + "METADATA", meta + "WHEEL",
                                                                    meta + "RECORD"]))
    out = slim(src, tmp_path, keep_so=["cuda130"])
    with zipfile.ZipFile(out) as z:
        kept = set(z.namelist())
        record = z.read(meta + "RECORD").decode()
    assert "demo_pkg/libdemo_cuda130.so" in kept and "demo_pkg/__init__.py" in kept
    assert not {"demo_pkg/libdemo_cuda124.so", "demo_pkg/libdemo_rocm64.so"} & kept
    assert {line.split(",")[0] for line in record.splitlines()} == kept
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(out)], check=True)
    assert (site / "demo_pkg" / "libdemo_cuda130.so").is_file() and not (site / "demo_pkg" / "libdemo_cuda124.so").exists()


def test_slim_wheel_drops_a_folder_and_keeps_every_library_when_none_is_named(tmp_path):
    """Unsloth's wheel without its studio/ web app: the package and its libraries stay, RECORD follows."""
    src = tmp_path / "in" / "peer-1.0-py3-none-any.whl"
    src.parent.mkdir()
    names = ["peer/__init__.py", "peer/libfast.so", "studio/frontend/app.js", "studio/backend/main.py"]
    meta = "peer-1.0.dist-info/"
    with zipfile.ZipFile(src, "w") as z:
        for n in names:
            z.writestr(n, "x = 1\n")
        z.writestr(meta + "RECORD", "".join(f"{n},,\n" for n in [*names, meta + "RECORD"]))
    with zipfile.ZipFile(slim(src, tmp_path, drop=["studio/"])) as z:
        kept = set(z.namelist())
        record = {line.split(",")[0] for line in z.read(meta + "RECORD").decode().splitlines()}
    assert kept == {"peer/__init__.py", "peer/libfast.so", meta + "RECORD"} == record
