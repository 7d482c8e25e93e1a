"""Driving the real OHIF v3 viewer in headless Debian Chromium (Playwright, executable_path only).

What the viewer draws is read from the viewer itself: its services (display sets, segmentations, the
segment colours), the cornerstone labelmap voxels, the viewport's own canvas<->world transform, and the
viewport canvas pixels with the overlay shown and hidden. Console messages are kept: OHIF reports a crashed
viewport only as a console message containing "Error Boundary"."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's package (make install); Playwright never downloads a browser


@dataclass
class ViewerPage:
    page: Page
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    # -- loading ---------------------------------------------------------------------------------
    def open_study(self, url: str, timeout_s: float = 60) -> None:
        self.page.goto(url)
        self.page.wait_for_selector("canvas.cornerstone-canvas", timeout=timeout_s * 1000)
        banner = self.page.get_by_text("Confirm and hide")
        if banner.count():
            banner.first.click()  # the "investigational use" banner covers the bottom of the viewport
        self.page.wait_for_function("() => window.services && window.cornerstone.getRenderingEngines().length > 0")

    def display_sets(self) -> list[dict[str, Any]]:
        return self.page.evaluate(
            """() => window.services.displaySetService.getActiveDisplaySets().map(d => ({
                 uid: d.displaySetInstanceUID, modality: d.Modality, description: d.SeriesDescription || '',
                 series: d.SeriesInstanceUID}))"""
        )

    def open_series(self, modality: str, timeout_s: float = 30) -> None:
        """Double-click the study browser's thumbnail of the (single) series of this modality."""
        thumbnail = self.page.locator("[data-cy^='study-browser-thumbnail']").filter(has_text=modality + "\n")
        thumbnail.first.dblclick()
        if modality == "SEG":
            self.page.wait_for_function(
                "() => window.services.segmentationService.getSegmentations().length > 0", timeout=timeout_s * 1000
            )
        time.sleep(1.0)

    # -- segmentation state ----------------------------------------------------------------------
    def labelmap_voxels(self) -> dict[int, int]:
        """Voxels per segment index in the labelmap OHIF built from the SEG."""
        counts = self.page.evaluate(
            """() => {
              const seg = window.services.segmentationService.getSegmentations()[0];
              const counts = {};
              for (const id of seg.representationData.Labelmap.imageIds) {
                const image = window.cornerstone.cache.getImage(id);
                const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
                for (let i = 0; i < data.length; i++) if (data[i]) counts[data[i]] = (counts[data[i]] || 0) + 1;
              }
              return counts;
            }"""
        )
        return {int(k): int(v) for k, v in counts.items()}

    def segment_colour(self, segment: int) -> tuple[int, int, int]:
        rgba = self.page.evaluate(
            """(segment) => {
              const ss = window.services.segmentationService;
              const seg = ss.getSegmentations()[0];
              const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
              return ss.getSegmentColor(vp.id, seg.segmentationId, segment);
            }""",
            segment,
        )
        return int(rgba[0]), int(rgba[1]), int(rgba[2])

    def show_segmentation(self, visible: bool) -> None:
        self.page.evaluate(
            """(visible) => {
              const ss = window.services.segmentationService;
              const seg = ss.getSegmentations()[0];
              const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
              const tools = window.cornerstoneTools;
              tools.segmentation.config.visibility.setSegmentationRepresentationVisibility(
                vp.id, {segmentationId: seg.segmentationId, type: tools.Enums.SegmentationRepresentations.Labelmap},
                visible);
              vp.render();
            }""",
            visible,
        )
        time.sleep(0.5)

    # -- the viewport -------------------------------------------------------------------------------
    def image_ids(self) -> list[str]:
        return self.page.evaluate("() => window.cornerstone.getRenderingEngines()[0].getViewports()[0].getImageIds()")

    def go_to_slice(self, index: int) -> None:
        for _ in range(3):  # OHIF may reset the index just after the first image: set until it holds
            self.page.evaluate(
                """async (index) => {
                  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
                  await vp.setImageIdIndex(index); vp.render();
                }""",
                index,
            )
            time.sleep(0.6)
            if self.current_slice() == index:
                return
        raise AssertionError(f"the viewport does not stay on image {index}")

    def current_slice(self) -> int:
        return int(
            self.page.evaluate(
                "() => window.cornerstone.getRenderingEngines()[0].getViewports()[0].getCurrentImageIdIndex()"
            )
        )

    def canvas_to_world(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(origin, world step per canvas pixel along x, along y) from the viewport's own transform."""
        o, x, y = self.page.evaluate(
            """() => { const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
                       return [vp.canvasToWorld([0, 0]), vp.canvasToWorld([1, 0]), vp.canvasToWorld([0, 1])]; }"""
        )
        origin = np.asarray(o, dtype=np.float64)
        return origin, np.asarray(x) - origin, np.asarray(y) - origin

    def canvas_pixels(self) -> npt.NDArray[np.float32]:
        from matplotlib import image as mpimg

        for attempt in range(5):  # OHIF replaces the canvas when a viewport is rebuilt (e.g. as a SEG loads)
            try:
                shot = self.page.locator("canvas.cornerstone-canvas").first.screenshot()
                break
            except PlaywrightError:
                if attempt == 4:
                    raise
                time.sleep(0.2)
        return np.asarray(mpimg.imread(io.BytesIO(shot), format="png"), dtype=np.float32)[..., :3]

    def settled_canvas_pixels(self, tries: int = 12, gap_s: float = 0.3) -> npt.NDArray[np.float32]:
        """The canvas once two shots in a row are the same: on a loaded machine OHIF may still be drawing
        the slice or the overlay a fixed sleep after the change (CI once read a half-drawn overlay)."""
        shot = self.canvas_pixels()
        for _ in range(tries):
            time.sleep(gap_s)
            again = self.canvas_pixels()
            if again.shape == shot.shape and np.array_equal(again, shot):
                return again
            shot = again
        raise AssertionError(f"the viewport canvas kept changing for {tries * gap_s:.1f} s")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))

    # -- SR ------------------------------------------------------------------------------------------
    def sr_annotations(self) -> list[dict[str, Any]]:
        self.page.evaluate(
            """() => { const e = window.cornerstone.getRenderingEngines()[0];
                       window.cornerstoneTools.utilities.triggerAnnotationRenderForViewportIds(
                         e.getViewports().map(v => v.id)); }"""
        )
        time.sleep(0.5)
        return self.page.evaluate(
            """() => window.cornerstoneTools.annotation.state.getAllAnnotations()
                 .filter(a => a.metadata.toolName === 'DICOMSRDisplay')
                 .map(a => ({uid: a.annotationUID, labels: (a.data.labels || []).map(l => [l.label, l.value]),
                             points: (a.data.handles.points || []).length,
                             image: a.metadata.referencedImageId || ''}))"""
        )

    def drawn_text(self) -> list[str]:
        return self.page.eval_on_selector_all("svg text, svg tspan", "els => els.map(e => e.textContent || '')")

    def viewer_errors(self) -> list[str]:
        return [m for m in self.console if "Error Boundary" in m] + self.page_errors


@contextmanager
def chromium_page(width: int = 1400, height: int = 900) -> Iterator[ViewerPage]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            # OHIF 3.13 shows an onboarding tour over the image unless this is set
            context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
            page = context.new_page()
            viewer = ViewerPage(page)
            page.on("console", lambda message: viewer.console.append(f"{message.type}: {message.text}"))
            page.on("pageerror", lambda error: viewer.page_errors.append(str(error)))
            yield viewer
        finally:
            browser.close()


def overlay_mask(with_overlay: npt.NDArray[np.float32], without: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Canvas pixels the segmentation overlay changed."""
    return np.abs(with_overlay - without).sum(axis=-1) > 0.08


def projected_mask(
    labels: npt.NDArray[np.integer],
    index_to_world: npt.NDArray[np.float64],
    transform: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]],
    shape: tuple[int, int],
    label: int | None = None,
) -> npt.NDArray[np.bool_]:
    """Where the true lesion voxels lie on the canvas: each canvas pixel centre is taken to patient
    coordinates with the viewport's own transform and looked up (nearest voxel) in the label volume."""
    origin, step_x, step_y = transform
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]]
    world = origin + (columns[..., None] + 0.5) * step_x + (rows[..., None] + 0.5) * step_y
    world_to_index = np.linalg.inv(index_to_world)
    homogeneous = np.concatenate([world, np.ones((*shape, 1))], axis=-1)
    index = np.rint(homogeneous @ world_to_index.T)[..., :3].astype(int)
    inside = np.all((index >= 0) & (index < np.array(labels.shape)), axis=-1)
    values = np.zeros(shape, dtype=labels.dtype)
    values[inside] = labels[tuple(index[inside].T)]
    return values == label if label is not None else values > 0


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum() + b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 1.0
