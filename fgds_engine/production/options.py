"""The options of a generation run and which part of it this process runs (``Worker``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..fields import check_fields, option, parse_shard
from ..writers import IMAGE_FORMATS, WRITERS, Encoding

FORMATS = tuple(WRITERS)


def unit_size(format: str, batch_size: int, samples_per_shard: int) -> int:  # noqa: A002
    """Jobs per unit of work: one batch (ImageFolder), or one tar of whole batches (WebDataset)."""
    if format == "imagefolder":
        return batch_size
    return -(-samples_per_shard // batch_size) * batch_size


@dataclass(frozen=True)
class GenerateOptions:
    """Options of a generation run (the sampler's own are in ``SamplerConfig``).

    Args:
        batch_size: samples per sampler call, or "auto": the largest batch (and feedback chunk) that fits the
            device's free memory (``memory.plan_batch``; fixed on the CPU), resolved before the run starts and
            reused from ``run.json`` on resume.
        format: "imagefolder" (OUT/<class>/<job id>.png) or "webdataset" (OUT/shard-<unit>.tar).
        image_format: "png" (lossless, as the paper saved), "jpeg" or "webp"; quality (JPEG / WebP, 1-100)
            and png_level (PNG compression, 0-9) set the encoder.
        write_workers: threads that encode and write while the sampler runs (0: in the sampling loop); not
            part of the run's configuration (the bytes do not depend on it).
        samples_per_shard: jobs per WebDataset tar (rounded up to whole batches).
        max_retries: a sample that comes out NaN/inf is retried this many times with derived seeds.
        noise_level: noise augmentation of the CLIP image embedding (unCLIP pipelines).
        shard: (i, n): this invocation runs the i-th of n shards (SLURM arrays); torchrun ranks split further.
        new_run: archive the manifest of a run with another configuration instead of refusing to mix.
        verify: check every image of this worker's completed units (not only the last unit of each part, as a
            resume does) and regenerate the units that lack one.
        upload: an fsspec URL (``s3://bucket/prefix``): the run's files go there, the output folder only
            stages them (``production.store``); upload_options: the backend's arguments as a JSON object (no
            credentials); upload_retries / upload_backoff: tries after the first failure of a store call, and
            the first wait in seconds (doubling, at most 30 s). None of them enters the run's identity.
    """

    batch_size: int | str = option(
        8, "samples per sampler call, or auto (the largest that fits the GPU's memory)")
    format: str = option("imagefolder", "imagefolder | webdataset")
    image_format: str = option("png", "png | jpeg | webp", neutral="png")
    quality: int = option(95, "JPEG / WebP quality", low=1, high=100, inert_unless="image_format")
    png_level: int = option(6, "PNG compression level (1: 4x faster to encode, ~15% larger)", low=0, high=9)
    write_workers: int = option(2, "threads encoding and writing images while the sampler runs (0: none)",
                                low=0, identity=False)
    samples_per_shard: int = option(256, "jobs per WebDataset tar", low=1)
    max_retries: int = option(2, "retries of a NaN sample (derived seeds)", low=0)
    noise_level: int = option(0, "unCLIP image-embedding noise augmentation", low=0)
    shard: tuple[int, int] = option((0, 1), "run shard i of n, as i/n", parse=parse_shard, metavar="I/N",
                                    identity=False)
    new_run: bool = option(False, "archive the manifest of a differently configured run and start over",
                           identity=False)
    verify: bool = option(False, "check every image this worker's unit records say is done, and regenerate "
                          "the units whose images are missing (reads every image: slow)", identity=False)
    upload: str | None = option(None, "an fsspec URL (s3://bucket/prefix, gs://..., az://...): the run's "
                                "images and journal go there, OUT only stages them; resume from any node",
                                identity=False, metavar="URL")
    upload_options: str | None = option(None, "the store backend's arguments as a JSON object, e.g. "
                                        "'{\"endpoint_url\": \"http://...\"}' (credentials only from its "
                                        "standard environment)", identity=False, metavar="JSON")
    upload_retries: int = option(5, "tries after a store call fails, before a clean stop", low=0, high=100,
                                 identity=False)
    upload_backoff: float = option(1.0, "seconds before the first retry of a store call (doubling, at most "
                                   "30)", low=0.0, high=30.0, identity=False)

    def __post_init__(self):
        check_fields(self)
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise InputError(f"batch_size must be an integer >= 1 or 'auto', got {self.batch_size!r}")
        if self.format not in FORMATS:
            raise InputError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise InputError(f"image_format must be one of {tuple(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.image_format == "png" and self.quality != 95:
            raise InputError("--quality is for --image-format jpeg or webp (PNG is lossless: --png-level)")
        if self.image_format != "png" and self.png_level != 6:
            raise InputError("--png-level is for --image-format png")
        if self.format == "imagefolder" and self.samples_per_shard != 256:
            raise InputError("--samples-per-shard is for --format webdataset (an ImageFolder has no shards)")
        if self.upload is None and (self.upload_options is not None or self.upload_retries != 5
                                    or self.upload_backoff != 1.0):
            raise InputError("--upload-options, --upload-retries and --upload-backoff are for --upload")
        if self.upload is not None and self.new_run:
            raise InputError("--new-run with --upload: start a new run under another prefix (the store's "
                             "files of the old run stay where they are)")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise InputError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")

    @property
    def unit_size(self) -> int:
        return unit_size(self.format, self.batch_size, self.samples_per_shard)

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.image_format, self.quality, self.png_level)


@dataclass
class Worker:
    """Which part of the work this process runs: shard i of n, torch.distributed rank r of world w."""

    shard: int = 0
    shards: int = 1
    rank: int = 0
    world: int = 1

    @property
    def index(self) -> int:
        return self.shard * self.world + self.rank

    @property
    def count(self) -> int:
        return self.shards * self.world

    @property
    def tag(self) -> str:
        """Suffix of this worker's temp files: a worker cleans up only its own."""
        return f".w{self.index}of{self.count}"

    @property
    def manifest_name(self) -> str:
        return f"manifest-{self.part}.jsonl"

    @property
    def units_name(self) -> str:
        return f"units-{self.part}.bin"

    @property
    def part(self) -> str:
        return f"shard{self.shard}of{self.shards}-rank{self.rank}of{self.world}"
