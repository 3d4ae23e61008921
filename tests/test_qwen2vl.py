"""Qwen2-VL and Qwen2.5-VL image chat served end to end (tiny random models of both variants, real
tritonserver) against transformers `generate`: images of their own sizes, several per request,
conversations, batches of mixed sizes, streaming, seeded sampling, bad inputs."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests import openai_conformance as conformance
from tests.conftest import encode_image, random_image, runs_until_batched, start_server
from tests.test_llava import metric
from tritonkit.build import build
from tritonkit.client import TritonkitClient, pack_byte_rows
from tritonkit.errors import InferenceError, InputError
from tritonkit.families import get_family
from tritonkit.families.qwen2vl import QwenVLBuildOptions, image_inputs
from tritonkit.qwen_vl import PatchRecipe, image_tokens

pytestmark = pytest.mark.server
NEW_TOKENS = 10
VARIANTS = ("qwen2vl", "qwen2_5vl")
# (height, width): small, wide, tall, and one over the tiny processor's pixel budget (resized down)
SIZES = [(60, 90), (200, 120), (56, 300), (400, 560)]


def image(seed: int, size=(96, 72)) -> bytes:
    return encode_image(random_image(*size, seed=seed), "JPEG")


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module", params=VARIANTS)
def qwen(request, tiny_model_dir):
    """(family, spec, loaded model, server) of one variant."""
    family = request.param
    model_dir = tiny_model_dir(family)
    spec = get_family(family)
    server = start_server(request.getfixturevalue(f"{family}_repository"))
    yield family, spec, spec.load(str(model_dir)), server
    server.stop()


def user(images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def served_patches(repository, family: str, files: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values, image_grid_thw) as the repository's DALI preprocessing computes them."""
    from tritonkit.preprocessing.dali import image_patches
    from tritonkit.preprocessing.image import ImageRecipe
    from tritonkit.qwen_vl import PatchRecipe
    from tritonkit.repository import read_repository

    parameters = read_repository(repository)[f"{family}_image_preprocess"].parameters
    recipe = PatchRecipe.from_json(parameters["patch_recipe"].string_value)
    return image_patches(recipe, ImageRecipe.from_json(parameters["image_recipe"].string_value), files)


def reference(qwen, files: list[bytes], messages: list[dict]) -> str:
    """transformers `generate` (greedy) on the patches the served preprocessing computes."""
    family, spec, loaded, server = qwen
    processed = served_patches(server.repository, family, files) if files else None
    tokens = spec.reference_tokens(loaded, None, messages, NEW_TOKENS, processed=processed)
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)


def test_greedy_answers_equal_transformers_for_images_of_their_own_sizes(qwen):
    family, _, _, server = qwen
    with TritonkitClient(server.grpc_url) as client:
        answers = []
        for seed, size in enumerate(SIZES):
            data = image(seed, size)
            answers.append(
                client.chat(data, "What is in the picture?", model=f"{family}_chat", max_new_tokens=NEW_TOKENS)
            )
            assert answers[-1] == reference(qwen, [data], user(1, "What is in the picture?")), size
    assert len(set(answers)) > 1  # the answers depend on the image


def test_two_images_and_a_conversation_with_text_only_turns(qwen):
    family, _, _, server = qwen
    files = [image(7, (80, 120)), image(8, (150, 90))]
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}, {"type": "image"}]},
        {"role": "assistant", "content": "Two pictures."},
        {"role": "user", "content": "Which is brighter?"},
    ]
    with TritonkitClient(server.grpc_url) as client:
        two = client.chat(files, "Compare them.", model=f"{family}_chat", max_new_tokens=NEW_TOKENS)
        assert two == reference(qwen, files, user(2, "Compare them."))
        talk = client.chat(files, conversation, model=f"{family}_chat", max_new_tokens=NEW_TOKENS)
        as_parts = [
            {
                **m,
                "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"],
            }
            for m in conversation
        ]
        assert talk == reference(qwen, files, as_parts)
        streamed = client.chat_stream(files, conversation, model=f"{family}_chat_stream", max_new_tokens=NEW_TOKENS)
        assert "".join(streamed) == talk


def test_concurrent_requests_of_mixed_sizes_decode_together_with_the_same_answers(qwen):
    family, _, _, server = qwen
    cases = [([image(seed, size)], f"Question {seed}?") for seed, size in enumerate(SIZES)]
    cases += [([image(11, (64, 64)), image(12, (90, 140))], "Both?"), ([image(13, (120, 60))], "Colour?")]
    cases += [([image(14, (70, 70))], "One word."), ([image(15, (300, 200))], "Shapes?")]

    def ask(case):
        files, prompt = case
        with TritonkitClient(server.grpc_url) as client:
            return client.chat(files, prompt, model=f"{family}_chat", max_new_tokens=NEW_TOKENS)

    with TritonkitClient(server.grpc_url) as client:
        alone = [ask(case) for case in cases]

        def together():
            with ThreadPoolExecutor(max_workers=8) as pool:
                return list(pool.map(ask, cases))

        runs, batched = runs_until_batched(client, f"{family}_decoder", together, rows=len(cases))
    for run in runs:
        assert run == alone
    assert batched, "no run formed a decoder batch of more than one"


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(qwen):
    family, _, _, server = qwen
    options = {"temperature": 0.9, "seed": 42, "max_new_tokens": NEW_TOKENS}

    def ask(seed):
        with TritonkitClient(server.grpc_url) as client:
            return client.chat(image(seed), "Tell me a story.", model=f"{family}_chat", **options)

    alone = [ask(seed) for seed in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(ask, range(4))) == alone


def test_vision_features_equal_pytorch_for_four_sizes_in_one_run(qwen):
    import torch

    from tritonkit.engines import ONNX_RUNTIME
    from tritonkit.families.qwen2vl import image_inputs
    from tritonkit.qwen_vl import vision_inputs

    family, _, loaded, server = qwen
    pixels, grids = image_inputs(loaded, [pil(image(seed, size)) for seed, size in enumerate(SIZES)])
    assert len({tuple(g) for g in grids.tolist()}) == 4
    session = ONNX_RUNTIME.session(server.repository / f"{family}_vision_encoder" / "1" / "model.onnx")
    feed = {"PATCHES": pixels, **vision_inputs(grids, loaded.layout)}
    (served,) = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
    with torch.no_grad():
        want = loaded.model.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids)).pooler_output
    np.testing.assert_allclose(served, want.numpy(), atol=1e-4)


# DALI's antialiased cubic resize against PIL's bicubic (the processor's), measured on these images
# and the built-in varied ones (scripts/bench_qwen_vl_preprocessing.py): at most 7 grey levels at
# sharp edges of flat graphics, 0.1 on average; a one-pixel shift or a wrong patch order gives tens.
MAX_LEVELS, MEAN_LEVELS, MIN_FEATURE_COSINE = 8.0, 0.3, 0.998


def exif_rotated(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: DALI and the processor's input both apply it
    buffer = io.BytesIO()
    Image.fromarray(random_image(90, 150, seed=seed)).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def rgba(seed: int) -> bytes:
    pixels = np.concatenate([random_image(80, 120, seed=seed), np.full((80, 120, 1), 255, np.uint8)], axis=2)
    pixels[:30, :, 3] = 0
    return encode_image(pixels, "PNG")


def test_dali_patches_match_the_image_processor_on_varied_images(tiny_model_dir):
    """Every built-in varied image (8 kinds; colour, grayscale, RGBA) and the sizes above, an EXIF
    rotated JPEG, a 1x1 image (resized up to the minimum) and a wide strip: the same grids, pixels
    within a few grey levels, the tiny tower's features within MIN_FEATURE_COSINE."""
    import torch

    from tritonkit.calibration import varied_images
    from tritonkit.families.qwen2vl import image_inputs, image_limits
    from tritonkit.preprocessing.dali import image_patches
    from tritonkit.preprocessing.image import DALI_FORMATS, decode_image
    from tritonkit.qwen_vl import PatchRecipe

    loaded = get_family("qwen2vl").load(str(tiny_model_dir("qwen2vl")))
    recipe = PatchRecipe.from_processor(loaded.image_processor)
    limits = image_limits(DALI_FORMATS)
    files = [data for _, data in varied_images(24)] + [image(seed, size) for seed, size in enumerate(SIZES)]
    files += [exif_rotated(5), rgba(6), encode_image(random_image(1, 1, seed=7), "PNG")]
    files += [encode_image(random_image(20, 900, seed=8), "PNG")]
    levels = np.repeat(np.asarray(recipe.std, np.float32), recipe.patch_values // 3) * 255
    for k, data in enumerate(files):
        ours, grid = image_patches(recipe, limits, [data])
        theirs, their_grid = image_inputs(loaded, [decode_image(data, limits)])
        assert grid.tolist() == their_grid.tolist(), k
        diff = np.abs(ours - theirs) * levels
        assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (k, diff.max(), diff.mean())
        with torch.no_grad():
            visual, grid_thw = loaded.model.model.visual, torch.from_numpy(grid)
            a = visual(torch.from_numpy(ours), grid_thw=grid_thw).pooler_output
            b = visual(torch.from_numpy(theirs), grid_thw=grid_thw).pooler_output
        assert torch.nn.functional.cosine_similarity(a, b).min() >= MIN_FEATURE_COSINE, k


def test_the_resize_is_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    from tritonkit.errors import InputError
    from tritonkit.qwen_vl import smart_resize

    rng = np.random.default_rng(0)
    sizes = [(h, w) for h in (1, 14, 27, 28, 42, 70, 98, 223, 224, 1080) for w in (1, 28, 70, 99, 640, 1920)]
    sizes += [tuple(int(x) for x in rng.integers(1, 3000, 2)) for _ in range(300)]
    for budget in ((3136, 50176), (3136, 12845056), (200704, 1003520)):
        for height, width in sizes:
            if max(height, width) > 200 * min(height, width):
                with pytest.raises(InputError, match="aspect ratio"):
                    smart_resize(height, width, 28, *budget)
                continue
            assert smart_resize(height, width, 28, *budget) == theirs(height, width, 28, *budget), (height, width)


def test_a_strip_over_the_processors_aspect_ratio_fails_its_own_request(qwen):
    family, _, _, server = qwen
    with TritonkitClient(server.grpc_url) as client:
        strip = encode_image(random_image(4, 1000, seed=3), "PNG")
        with pytest.raises(InferenceError, match=re.escape("IMAGES[1]: 1000x4 is over the 200:1 aspect ratio")):
            client.chat([image(1), strip], "What?", model=f"{family}_chat")
        assert client.chat(image(1), "Fine?", model=f"{family}_chat", max_new_tokens=2)


def test_python_preprocessing_answers_equal_transformers_on_the_processors_own_pixels(tiny_model_dir, tmp_path):
    """`--preprocessing python`: the checkpoint's processor in the stage, exact to transformers."""
    from tritonkit.families.base import BuildOptions

    model_dir = tiny_model_dir("qwen2vl")
    build("qwen2vl", str(model_dir), tmp_path / "repo", options=BuildOptions(preprocessing="python"))
    assert not (tmp_path / "repo" / "qwen2vl_image_preprocess" / "1" / "model.dali").exists()
    spec = get_family("qwen2vl")
    loaded = spec.load(str(model_dir))
    server = start_server(tmp_path / "repo")
    try:
        files = [image(31, (200, 120)), image(32, (60, 90))]
        with TritonkitClient(server.grpc_url) as client:
            served = client.chat(files, "Compare.", model="qwen2vl_chat", max_new_tokens=NEW_TOKENS)
            with pytest.raises(InferenceError, match=re.escape("IMAGES[1]: not a decodable image")):
                client.chat([image(1), b"GIF89a broken"], "What?", model="qwen2vl_chat")
        tokens = spec.reference_tokens(loaded, [pil(f) for f in files], user(2, "Compare."), NEW_TOKENS)
        assert served == loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        server.stop()


def test_an_images_visual_tokens_are_bounded_by_what_a_vision_run_holds(tiny_model_dir):
    """A checkpoint whose processor allows more patches than one vision run's attention holds in
    ATTENTION_BUDGET_BYTES (Qwen2-VL-7B's 12.8 MP with 16 heads: 65,536 patches, 275 GB of scores)
    has its max_pixels lowered; --max-image-tokens picks the bound within it, and only for Qwen-VL."""
    from tritonkit.families.base import BuildOptions
    from tritonkit.families.qwen2vl import ATTENTION_BUDGET_BYTES

    spec = get_family("qwen2vl")
    loaded = spec.load(str(tiny_model_dir("qwen2vl")))
    assert ATTENTION_BUDGET_BYTES == 2 * 2**30
    assert loaded.attention_patches == 16384  # 2 heads: 4 x 2 x 16384² bytes = 2 GiB
    assert spec.fit(loaded, BuildOptions()) == []  # the tiny processor's 64 tokens fit
    with pytest.raises(InputError, match=re.escape("--max-image-tokens 5000: use 4 to 4096")):
        spec.fit(loaded, BuildOptions(family=QwenVLBuildOptions(max_image_tokens=5000)))
    with pytest.raises(InputError, match=re.escape("--max-image-tokens 3: use 4 to 4096")):
        spec.fit(loaded, BuildOptions(family=QwenVLBuildOptions(max_image_tokens=3)))
    with pytest.raises(InputError, match="QwenVLBuildOptions are not clip's options: build it with ImageOptions"):
        get_family("clip").family_options(BuildOptions(family=QwenVLBuildOptions(max_image_tokens=16)))

    loaded.model.config.vision_config.num_heads = 16  # as Qwen2-VL-7B's tower
    loaded.image_processor = type(loaded.image_processor)(min_pixels=3136, max_pixels=12845056)
    assert loaded.attention_patches == 5792 and loaded.patches_per_run <= 5792
    assert spec.fit(loaded, BuildOptions()) == [
        "image processor: max_pixels 12845056 -> 1135232 (1448 visual tokens an image; "
        "a vision run's attention within 2048 MiB)"
    ]
    pixels, grids = image_inputs(loaded, [Image.new("RGB", (4000, 3000))])
    assert image_tokens(grids[0], 2) <= 1448 and len(pixels) <= loaded.attention_patches
    assert loaded.largest_run == 5792  # what the plan and the TensorRT profile size a run at
    loaded.image_processor = type(loaded.image_processor)(min_pixels=1449 * 28 * 28, max_pixels=12845056)
    with pytest.raises(InputError, match="min_pixels 1136016 is more than one vision run's attention holds"):
        spec.fit(loaded, BuildOptions())


def test_max_image_tokens_resizes_large_images_down_as_the_processor_does(tiny_model_dir, tmp_path):
    """--max-image-tokens 16: a large image is resized to at most 16 visual tokens, by the DALI
    pipeline and by the processor alike, and answered as transformers answers with that processor."""
    from tritonkit.families.base import BuildOptions

    model_dir = tiny_model_dir("qwen2vl")
    said: list[str] = []
    options = BuildOptions(preprocessing="python", family=QwenVLBuildOptions(max_image_tokens=16))
    build("qwen2vl", str(model_dir), tmp_path / "repo", options=options, progress=said.append)
    assert "image processor: max_pixels 50176 -> 12544 (16 visual tokens an image; --max-image-tokens)" in said
    spec = get_family("qwen2vl")
    loaded = spec.load(str(model_dir))
    spec.fit(loaded, options)
    big = image(41, (400, 560))
    _, grids = image_inputs(loaded, [pil(big)])
    assert tuple(grids[0]) == (1, 6, 8)  # 84 x 112 pixels: 3 x 4 = 12 visual tokens (16 would stretch it)
    recipe = PatchRecipe.from_processor(loaded.image_processor)  # what the DALI stage sizes images by
    assert recipe.max_pixels == 16 * 28 * 28 and recipe.grid(*recipe.resized(400, 560)) == (1, 6, 8)
    server = start_server(tmp_path / "repo")
    try:
        with TritonkitClient(server.grpc_url) as client:
            served = client.chat(big, "Describe.", model="qwen2vl_chat", max_new_tokens=NEW_TOKENS)
        tokens = spec.reference_tokens(loaded, [pil(big)], user(1, "Describe."), NEW_TOKENS)
        assert served == loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        server.stop()


def test_a_repeated_image_is_not_encoded_again(qwen):
    family, _, _, server = qwen
    fresh = encode_image(random_image(64, 96, seed=4321), "PNG")
    names = ("tritonkit_feature_cache_hits_total", "tritonkit_feature_cache_misses_total")
    encoder = f"{family}_vision_encoder"
    before = [metric(server, name, encoder) for name in names]
    with TritonkitClient(server.grpc_url) as client:
        for prompt in ("One?", "Two?", "Three?"):
            client.chat(fresh, prompt, model=f"{family}_chat", max_new_tokens=2)
    after = [metric(server, name, encoder) for name in names]
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)


@pytest.mark.parametrize(
    "files, prompt, message",
    [
        ([image(1), b"%PDF-1.4 not an image"], "What?", "IMAGES[1]: not a decodable image"),
        ([image(seed) for seed in range(5)], "What?", "IMAGES: 1 to 4 images per request, got 5"),
        ([image(1)], user(2, "Two?"), "MESSAGES: exactly one {type: image} part (it stands for IMAGE), got 2"),
        ([image(1), image(2)], user(1, "One?"), "MESSAGES: 2 {type: image} parts (one per image sent), got 1"),
        ([image(1)], "<|image_pad|> What?", "PROMPT: do not write <|image_pad|>"),
    ],
)
def test_bad_inputs_fail_their_own_request_with_a_message(qwen, files, prompt, message):
    family, _, _, server = qwen
    with TritonkitClient(server.grpc_url) as client:
        with pytest.raises(InferenceError, match=re.escape(message)):
            client.chat(files, prompt, model=f"{family}_chat")
        assert client.chat(image(1), "Fine?", model=f"{family}_chat", max_new_tokens=2)  # the server is fine


def test_image_and_images_together_are_refused(qwen):
    family, _, _, server = qwen
    inputs = {
        "IMAGE": pack_byte_rows([image(1)]),
        "IMAGES": np.array([[image(2)]], dtype=object),
        "PROMPT": np.array([[b"What?"]], dtype=object),
    }
    with (
        TritonkitClient(server.grpc_url) as client,
        pytest.raises(InferenceError, match=re.escape("IMAGE or IMAGES: give exactly one")),
    ):
        client.infer(f"{family}_chat", inputs)


def test_a_turn_without_an_image_sent_to_the_image_ensemble_fails_with_one_line_naming_the_inputs(qwen):
    from tritonkit.client import chat_inputs

    family, _, _, server = qwen
    with TritonkitClient(server.grpc_url) as client:
        with pytest.raises(InferenceError) as raised:
            client.infer(f"{family}_chat", chat_inputs(None, "Hello, who are you?"))
        message = str(raised.value)
        assert "IMAGE or IMAGES: none given; every turn to this ensemble needs an image" in message, message
        assert "NAME_chat_text" in message and "out of bounds" not in message and "\n" not in message.strip()
        assert client.chat(image(1), "Fine?", model=f"{family}_chat", max_new_tokens=2)  # the server is fine


TEXT_TURN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
]


def test_a_turn_without_an_image_equals_transformers_alone_and_beside_image_turns(qwen):
    """NAME_chat_text(_stream): the language model alone (M-RoPE positions of text only), equal to
    transformers `generate`; sent together with image turns, each answer is still its own."""
    family, _, _, server = qwen
    as_parts = [
        {**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
        for m in TEXT_TURN
    ]
    want = reference(qwen, [], as_parts)
    files = [image(31, (90, 60)), image(32, (64, 128))]
    with_image = reference(qwen, files[:1], user(1, "Describe."))
    with TritonkitClient(server.grpc_url) as client:
        assert client.chat(None, TEXT_TURN, model=f"{family}_chat", max_new_tokens=NEW_TOKENS) == want
        streamed = client.chat_stream(None, TEXT_TURN, model=f"{family}_chat_stream", max_new_tokens=NEW_TOKENS)
        assert "".join(streamed) == want

        def ask(k: int) -> str:
            with TritonkitClient(server.grpc_url) as own:
                if k % 2:
                    return own.chat(files[:1], user(1, "Describe."), model=f"{family}_chat", max_new_tokens=NEW_TOKENS)
                return own.chat(None, TEXT_TURN, model=f"{family}_chat", max_new_tokens=NEW_TOKENS)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
    assert answers == [want, with_image] * 3


def test_the_openai_gateway_serves_several_images_as_the_ensemble_does(qwen):
    import base64
    import signal
    import subprocess

    openai = pytest.importorskip("openai")
    from tests.conftest import free_port, serve_command, wait_until_healthy

    family, _, _, server = qwen
    files = [image(21, (90, 60)), image(22, (64, 128))]
    with TritonkitClient(server.grpc_url) as client:
        want = client.chat(files, user(2, "Compare them."), model=f"{family}_chat", max_new_tokens=NEW_TOKENS)
    grpc_port, openai_port = free_port(), free_port()
    serve = subprocess.Popen(
        serve_command(server.repository, grpc_port, None, "--openai-port", str(openai_port), "--cache-mb", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert serve.stdout.readline().startswith("tritonkit: ready:")
        wait_until_healthy(f"http://127.0.0.1:{openai_port}")
        sdk = conformance.sdk(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="unused", max_retries=0)
        parts = [
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{base64.b64encode(f).decode()}"}}
            for f in files
        ]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare them."}]}]
        answer = sdk.chat.completions.create(model=family, messages=messages, max_tokens=NEW_TOKENS)
        assert answer.choices[0].message.content == want
        streamed = sdk.chat.completions.create(model=family, messages=messages, max_tokens=NEW_TOKENS, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == want
        with pytest.raises(openai.BadRequestError, match=re.escape("IMAGES: 1 to 4 images per request, got 5")):
            sdk.chat.completions.create(
                model=family, messages=[{"role": "user", "content": parts * 2 + parts[:1]}], max_tokens=2
            )
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)


NATIVE_BF16 = "BF16" in __import__("tritonkit.engines", fromlist=["cpu_capabilities"]).cpu_capabilities()


@pytest.mark.parametrize(
    "engine, precision",
    [  # ONNX Runtime's INT8 (the tower's graph as the OpenVINO one) in scripts/heavy_tests.sh
        pytest.param("onnxruntime", "int8", marks=pytest.mark.heavy),
        ("openvino", "bf16" if NATIVE_BF16 else "int8"),
    ],
)
def test_reduced_precision_vision_towers_report_their_accuracy_and_serve(tiny_model_dir, tmp_path, engine, precision):
    from tritonkit.families.base import BuildOptions
    from tritonkit.precision import PrecisionOptions

    repository = tmp_path / "repo"
    result = build(
        "qwen2_5vl",
        str(tiny_model_dir("qwen2_5vl")),
        repository,
        options=BuildOptions(engine=engine),
        precision=PrecisionOptions(precision),
    )
    report = result.accuracy[result.precision_variant]
    assert report.passed and report.graphs["vision_encoder"]["min_cosine"] >= 0.99, report.summary()
    assert "built-in" in report.data_source
    server = start_server(repository)
    try:
        with TritonkitClient(server.grpc_url) as client:
            assert client.chat([image(1), image(2, (60, 120))], "Both?", model="qwen2_5vl_chat", max_new_tokens=4)
    finally:
        server.stop()


def test_a_gpu_repository_runs_every_stage_in_the_python_backend_on_kind_gpu(tiny_model_dir, tmp_path):
    from tritonkit.check import check_repository
    from tritonkit.families.base import BuildOptions
    from tritonkit.repository import read_repository

    build("qwen2vl", str(tiny_model_dir("qwen2vl")), tmp_path / "repo", options=BuildOptions(target="gpu"))
    configs = read_repository(tmp_path / "repo")
    from tritonclient.grpc import model_config_pb2

    kind = model_config_pb2.ModelInstanceGroup.Kind.Name
    kinds = {name: {kind(g.kind) for g in c.instance_group} for name, c in configs.items() if c.backend == "python"}
    gpu = {name for name, k in kinds.items() if k == {"KIND_GPU"}}
    assert gpu == {"qwen2vl_image_preprocess", "qwen2vl_vision_encoder", "qwen2vl_decoder", "qwen2vl_decoder_stream"}
    assert (tmp_path / "repo" / "qwen2vl_image_preprocess" / "1" / "model.dali").exists()  # GPU operators
    assert configs["qwen2vl_vision_encoder"].parameters["providers"].string_value.startswith("CUDAExecutionProvider")
    assert configs["qwen2vl_decoder"].parameters["device"].string_value == "cuda"
    assert check_repository(tmp_path / "repo", "gpu").ok


def test_a_gpu_repository_may_run_the_vision_graph_on_onnx_runtimes_tensorrt_provider(tiny_model_dir, tmp_path):
    """--engine onnxruntime-trt: the TensorRT provider first, with one optimisation profile from one
    merge unit to the most patches a run holds, and engines cached; without TensorRT and CUDA in
    ONNX Runtime the stage fails at load saying what to do."""
    import json

    from tritonkit.check import check_repository
    from tritonkit.engines import onnxruntime_providers
    from tritonkit.families.base import BuildOptions
    from tritonkit.repository import read_repository

    model_dir = tiny_model_dir("qwen2_5vl")
    build("qwen2_5vl", str(model_dir), tmp_path / "repo", options=BuildOptions(target="gpu", engine="onnxruntime-trt"))
    parameters = read_repository(tmp_path / "repo")["qwen2_5vl_vision_encoder"].parameters
    providers = parameters["providers"].string_value
    assert providers == "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider"
    loaded = get_family("qwen2_5vl").load(str(model_dir))
    most, values = 256, loaded.patch_values  # the largest run: one image at the tiny max_pixels (50,176)
    options = json.loads(parameters["tensorrt_options"].string_value)
    assert (
        options["trt_profile_min_shapes"]
        == f"PATCHES:4x{values},POSITIONS:4x2,SEGMENTS:4,WINDOW_INDEX:1,WINDOW_SEGMENTS:4"
    )
    assert options["trt_profile_max_shapes"] == (
        f"PATCHES:{most}x{values},POSITIONS:{most}x2,SEGMENTS:{most},WINDOW_INDEX:{most // 4},WINDOW_SEGMENTS:{most}"
    )
    assert options["trt_engine_cache_enable"] is True and options["trt_fp16_enable"] is False
    assert check_repository(tmp_path / "repo", "gpu").ok
    with pytest.raises(RuntimeError, match=r"lacks TensorrtExecutionProvider, CUDAExecutionProvider; .* TensorRT"):
        onnxruntime_providers({k: v.string_value for k, v in parameters.items()}, "qwen2_5vl_vision_encoder")
    with pytest.raises(
        InputError, match="leave out --native-backends; on a GPU use --engine onnxruntime or onnxruntime-trt"
    ):
        build("qwen2_5vl", str(model_dir), tmp_path / "native", options=BuildOptions(native_backends=True))


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["onnxruntime", "onnxruntime-trt"])
def test_a_gpu_repository_answers_as_transformers_on_a_gpu(tiny_model_dir, tmp_path, engine):
    """Never run here (no GPU): the GPU repository's greedy answer against transformers', the vision
    graph on ONNX Runtime's CUDA provider or its TensorRT provider."""
    from tritonkit.families.base import BuildOptions

    model_dir = tiny_model_dir("qwen2vl")
    build("qwen2vl", str(model_dir), tmp_path / "repo", options=BuildOptions(target="gpu", engine=engine))
    spec = get_family("qwen2vl")
    loaded = spec.load(str(model_dir))
    server = start_server(tmp_path / "repo")
    try:
        with TritonkitClient(server.grpc_url) as client:
            served = client.chat(image(3), "What?", model="qwen2vl_chat", max_new_tokens=NEW_TOKENS)
        # the CPU pipeline's patches: nvJPEG and libjpeg-turbo may differ by a grey level
        processed = served_patches(tmp_path / "repo", "qwen2vl", [image(3)])
        tokens = spec.reference_tokens(loaded, None, user(1, "What?"), NEW_TOKENS, processed=processed)
        assert served == loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        server.stop()
