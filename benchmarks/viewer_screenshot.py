"""A patient of a lungzarr store in neuroglancer (headless Chromium), read as plain NGFF 0.5: a screenshot.

What it shows is what any NGFF viewer gets from the store without lungzarr:
the patient group's first ``multiscales`` image (``hu``, native grid, mm),
and its ``labels/lungs`` and ``labels/nodules`` label images (2 mm grid), as
neuroglancer layers read over HTTP with ``zarr3://`` URLs. Neuroglancer
matches dimensions by name: the label images' axes are ``z2``, ``y2``,
``x2`` (their arrays' dimension names, as NGFF 0.5 requires), so their layer
transforms rename them to the CT's ``z``, ``y``, ``x``; both carry their own
mm scale and translation.

Steps: run ``lungzarr run`` on the shared LIDC-IDRI-0001 slab into a
temporary store (or use ``--store``), serve the store and neuroglancer's
client (shipped by ``pip install neuroglancer``, served by its Python server,
which holds the viewer state) on local ports, open the viewer in headless Chromium through Playwright (``pip
install playwright``; the system Chromium, no browser download), and save an
axial slice through the most probable nodule: the whole slice beside a zoom
on the nodule, as one PNG.

Usage::

    python benchmarks/viewer_screenshot.py [--store STORE] [--patient ID] [--out benchmarks/results/ngff_neuroglancer_lidc.png]
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "results" / "ngff_neuroglancer_lidc.png"
LIDC = Path("/work/shared/fixtures/lidc/LIDC-IDRI-0001")
CHROMIUM = "/usr/bin/chromium"
sys.path.insert(0, str(REPO))


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files under ``/data/`` from the store, CORS allowed (the viewer page has another origin)."""

    store_dir: Path

    def translate_path(self, path):
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        if path.startswith("/data/"):
            target = (self.store_dir / path[len("/data/"):]).resolve()
            if target == self.store_dir or self.store_dir in target.parents:
                return str(target)
        return str(self.store_dir / "__missing__")

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, *args):
        pass


def _serve(store_dir: Path):
    handler = type("Handler", (_Handler,), {"store_dir": store_dir.resolve()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _run_pipeline(work: Path) -> Path:
    """``lungzarr run`` of the LIDC slab (the real UNet, threads scheduler) into ``work``."""
    inp = work / "input"
    inp.mkdir(parents=True, exist_ok=True)
    link = inp / LIDC.name
    if not link.exists():
        link.symlink_to(LIDC)
    store = work / "lidc.zarr"
    subprocess.run([sys.executable, "-m", "lungzarr.cli", "run", str(inp), str(store), "--scheduler", "threads"],
                   check=True, cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    return store


def _segment_colour(rgba) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgba[:3])


def viewer_state(base: str, patient: str, centre_mm, *, store_dir: Path, scale_mm_per_px: float) -> dict:
    """The neuroglancer state: the CT, the lungs and the nodules label images, centred on ``centre_mm`` (z, y, x)."""
    group = store_dir / "patients" / patient
    mm = [1e-3, "m"]
    rename = {"outputDimensions": {"z": mm, "y": mm, "x": mm}}
    layers = [{
        "type": "image", "name": "hu (NGFF image, native grid)",
        "source": f"zarr3://{base}/data/patients/{patient}/",
        # CT lung window [-1000, 400] HU.
        "shader": "#uicontrol invlerp normalized(range=[-1000, 400], window=[-1100, 500])\n"
                  "void main() { emitGrayscale(normalized()); }",
    }]
    for name, alpha in (("lungs", 0.25), ("nodules", 0.55)):
        ome = json.loads((group / "labels" / name / "zarr.json").read_text())["attributes"]["ome"]
        colours = {str(c["label-value"]): _segment_colour(c["rgba"]) for c in ome["image-label"].get("colors", [])}
        layers.append({
            "type": "segmentation", "name": f"labels/{name} (NGFF label image, 2 mm)",
            "source": {"url": f"zarr3://{base}/data/patients/{patient}/labels/{name}/", "transform": rename},
            "segments": sorted(colours, key=int), "segmentColors": colours,
            "selectedAlpha": alpha, "notSelectedAlpha": 0.0, "hideSegmentZero": True,
        })
    z, y, x = (float(v) for v in centre_mm)
    return {
        "dimensions": {"x": mm, "y": mm, "z": mm},
        "displayDimensions": ["x", "y", "z"],
        "position": [x, y, z],
        "crossSectionScale": scale_mm_per_px,
        "projectionScale": 512,
        "layers": layers,
        "layout": "xy",
        "showAxisLines": False,
        "showDefaultAnnotations": False,
        "selectedLayer": {"visible": False},
    }


def _shot(page, viewer, state: dict, path: Path, *, settle_s: float) -> dict:
    """Set ``state`` on the viewer (the page follows it), wait for the data, save the page; the state it resolved."""
    import neuroglancer

    viewer.set_state(neuroglancer.ViewerState(json_data=state))
    time.sleep(1.0)
    page.wait_for_load_state("networkidle")
    time.sleep(settle_s)  # chunks decoded and drawn after the last fetch
    page.screenshot(path=str(path))
    return viewer.state.to_json()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an existing store (default: run the LIDC slab into a temp dir)")
    parser.add_argument("--patient", default="LIDC-IDRI-0001")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--size", type=int, default=560, help="pixels of each square panel")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds to wait after the network is idle")
    args = parser.parse_args(argv)

    import neuroglancer
    from PIL import Image, ImageDraw
    from playwright.sync_api import sync_playwright

    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.io.store import CohortStore, grid_from_attrs

    with tempfile.TemporaryDirectory(prefix="lungzarr-viewer-") as tmp:
        store_dir = args.store or _run_pipeline(Path(tmp))
        cs = CohortStore(store_dir, mode="r")
        table = cs.open_patient(args.patient, subgroup="nodules").to_dataframe()
        rows = select_nodules(table, dsb_filter=False).sort_values("prob_max", ascending=False)
        if not len(rows):
            raise SystemExit(f"patient {args.patient!r} has no candidate at p > 0.5 to centre on")
        nodule = rows.iloc[0]
        centre = (float(nodule.z_mm), float(nodule.y_mm), float(nodule.x_mm))
        grid = grid_from_attrs(cs.patient_attrs(args.patient), "grid_native")
        extent = float(max(abs(grid.step[1]) * grid.shape[1], abs(grid.step[2]) * grid.shape[2]))
        slice_centre = (centre[0], float(grid.axis(1).mean()), float(grid.axis(2).mean()))
        server, base = _serve(Path(store_dir))
        # neuroglancer's Python server serves its client and holds the state; the page shows it.
        neuroglancer.set_server_bind_address("127.0.0.1")
        viewer = neuroglancer.Viewer()
        panels, resolved = [], None
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                    "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
                page = browser.new_page(viewport={"width": args.size, "height": args.size})
                page.goto(viewer.get_viewer_url())
                page.wait_for_load_state("networkidle")
                for where, scale in ((slice_centre, extent / args.size), (centre, 60.0 / args.size)):
                    state = viewer_state(base, args.patient, where, store_dir=Path(store_dir), scale_mm_per_px=scale)
                    shot = Path(tmp) / f"panel{len(panels)}.png"
                    resolved = _shot(page, viewer, state, shot, settle_s=args.settle)
                    panels.append(Image.open(shot).convert("RGB"))
                browser.close()
        finally:
            server.shutdown()
            neuroglancer.stop()
        width = sum(im.width for im in panels)
        caption_h = 48
        out = Image.new("RGB", (width, panels[0].height + caption_h), "white")
        x = 0
        for im in panels:
            out.paste(im, (x, 0))
            x += im.width
        draw = ImageDraw.Draw(out)
        draw.text((8, panels[0].height + 6),
                  f"{args.patient}: NGFF 0.5 from the lungzarr store in neuroglancer (zarr3://). Axial slice "
                  f"z = {centre[0]:.1f} mm (LPS); left: whole slice, right: 60 mm around the top candidate",
                  fill="black")
        draw.text((8, panels[0].height + 24),
                  f"(p_max {nodule.prob_max:.3f}, {nodule.diameter_mm:.1f} mm, centre y {centre[1]:.1f}, "
                  f"x {centre[2]:.1f} mm, label {int(nodule.label)}). Blue: labels/lungs; red/orange: "
                  f"labels/nodules; grey: hu, window -1000..400 HU.", fill="black")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # A 256-colour palette keeps the PNG small (a CT window and three label colours).
        out.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
        result = {"out": str(args.out), "layers": [layer.get("name") for layer in resolved.get("layers", [])], "bytes": args.out.stat().st_size, "patient": args.patient,
                  "centre_mm": centre, "prob_max": float(nodule.prob_max), "label": int(nodule.label)}
        print(json.dumps(result))
        return result


if __name__ == "__main__":
    main()
