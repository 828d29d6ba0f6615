"""The low-priority lane for large images (tuneflow.serve.lane): a real child process at nice 19 that
decodes and reduces exactly as the served model's Predictor does, is restarted after kill -9, and
never blames an image for a death it did not cause."""
import asyncio
import io
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuneflow.errors import DataError
from tuneflow.serve.lane import LANE_NICE, LargeImageLane, LaneDied


def _photo_png(width: int, height: int) -> bytes:
    """A smooth colour picture with texture (not flat: resizing must do real work), as PNG."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    rgb = np.stack([xx / width * 255, yy / height * 255, (np.sin(xx / 37) * np.cos(yy / 23) + 1) * 127], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _zeros_png(side: int) -> bytes:
    """side x side grey zeros: side**2 decoded pixels in a few kB."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def _chars_read(pid: int) -> int:
    return int(re.search(r"rchar:\s+(\d+)", Path(f"/proc/{pid}/io").read_text()).group(1))


def _nice(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19 of /proc/PID/stat


@pytest.fixture(scope="module")
def predictor(serving_run):
    import tuneflow
    return tuneflow.load(serving_run[0])


def test_the_lane_decodes_as_the_predictor_does_at_low_priority_and_survives_kill_9(predictor):
    lane = LargeImageLane(predictor.input_size, predictor.resize, 50_000_000)
    big = _photo_png(2400, 1800)  # 4.3 Mpx, landscape: the crop matters
    try:
        async def scenario():
            first = await lane.run(big)
            pid = lane.pids()[0]
            nice = _nice(pid)
            # kill -9 while the child is idle: the next image goes to a new child, not to a 422
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            second = await lane.run(big)
            pid2 = lane.pids()[0]
            # kill -9 while it works on an image (it has read all of it): that image gets LaneDied
            heavy = _zeros_png(6000)
            before = _chars_read(pid2)
            task = asyncio.ensure_future(lane.run(heavy))
            while _chars_read(pid2) < before + len(heavy):
                await asyncio.sleep(0.005)
            os.kill(pid2, signal.SIGKILL)
            with pytest.raises(LaneDied, match="ended while decoding this one"):
                await task
            third = await lane.run(big)
            # an image the decoder refuses: DataError, as Predictor.decode raises it
            with pytest.raises(DataError, match="pixels"):
                await lane.run(_photo_png(8000, 7000))  # 56 Mpx > max_pixels
            return first, nice, second, third, pid, pid2
        first, nice, second, third, pid, pid2 = asyncio.run(scenario())
    finally:
        lane.close()
    expected = predictor.prepare([predictor.decode(big)])[0]
    assert first.dtype == np.uint8 and first.shape == (predictor.input_size,) * 2 + (3,)
    assert np.array_equal(first.astype(np.float32), expected)  # bit for bit, the served pixels
    assert np.array_equal(second, first) and np.array_equal(third, first)
    assert nice == LANE_NICE
    assert pid2 != pid and lane.restarts == 2


def test_a_server_answers_a_large_image_from_the_lane_like_a_small_one(predictor):
    from fastapi.testclient import TestClient

    from tuneflow.serve import ServeConfig, create_app
    big = _photo_png(2400, 1800)
    small = io.BytesIO()
    Image.open(io.BytesIO(big)).resize((800, 600)).save(small, format="PNG")
    with TestClient(create_app(predictor, ServeConfig(max_wait_ms=1))) as c:
        info = c.get("/v1/info").json()["serving"]
        assert info["large_image_pixels"] == 4_000_000 and info["large_image_nice"] == LANE_NICE
        r = c.post("/v1/classify", files=[("files", ("big.png", big)), ("files", ("small.png", small.getvalue()))])
        assert r.status_code == 200, r.text
        lane = c.app.state.lane
        assert len(lane.pids()) == 1  # the large image went to the child; the small one did not need it
    probs = predictor.predict_proba([big])[0]
    got = r.json()["predictions"][0]
    assert got["class"] == predictor.classes[int(np.argmax(probs))]
    assert abs(got["probability"] - float(probs.max())) < 1e-5
