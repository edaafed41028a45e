"""The schema the code expects, declared with SQLAlchemy Core.

This is the source of truth for `alembic revision --autogenerate` and for the drift test
(`compare_metadata` between this and a database migrated to head must be empty). Queries do
not use it: they are plain SQL over asyncpg. Views, triggers and grants live only in the
migrations (autogenerate does not see them); the tests cover them directly.
"""

from __future__ import annotations

from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from db.users import IMPORTED_PREFIX

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _id() -> Column:
    return Column("id", BigInteger, Identity(), primary_key=True)


def _now(name: str, nullable: bool = False) -> Column:
    return Column(name, DateTime(timezone=True), nullable=nullable, server_default=text("now()"))


def _at(name: str) -> Column:
    return Column(name, DateTime(timezone=True), nullable=True)


ROUND_STATUSES = ("queued", "generating", "ready", "closed", "failed")
VERDICTS = ("pick", "tie", "none")
CHOICE_OUTCOMES = ("recorded", "changed", "unchanged", "stale")
MODEL_KINDS = ("classifier", "sd_base", "sd_adapter")
MODEL_STATUSES = ("candidate", "testing", "serving", "retired")
MODEL_ACTIONS = ("registered", "testing", "promoted", "retired", "rolled_back")
JOB_STATES = ("queued", "running", "done", "dead", "cancelled")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


users = Table(
    "users",
    metadata,
    _id(),
    Column("discord_id", BigInteger, nullable=True, unique=True),
    # Stable pseudonymous id for exports and analysts; not derivable from the Discord id.
    Column(
        "pseudonym",
        Text,
        nullable=False,
        unique=True,
        server_default=text("replace(gen_random_uuid()::text, '-', '')"),
    ),
    Column("source", Text, nullable=False, server_default="discord"),
    _now("first_seen_at"),
    _now("last_seen_at"),
    Column("banned", Boolean, nullable=False, server_default=text("false")),
    Column("shadow_banned", Boolean, nullable=False, server_default=text("false")),
    Column("ban_reason", Text, nullable=True),
    _at("banned_at"),
    Column("banned_by", Text, nullable=True),
    _at("forgotten_at"),
    CheckConstraint(_in("source", ("discord", "import")), name="source"),
    CheckConstraint("NOT (banned AND shadow_banned)", name="one_ban"),
    # Imported users live in their own namespace (`import:` + the dataset's user hash), so
    # an import can never take a Discord user's pseudonym (`db.users.ensure_imported_user`).
    CheckConstraint(
        f"(source = 'import') = (pseudonym LIKE '{IMPORTED_PREFIX}%')", name="import_pseudonym"
    ),
)

# The sha256 of every pseudonym a Discord user stopped holding (forgotten: the row's pseudonym
# replaced or the row deleted), filled by a trigger (migration 0010). An import leaves out the
# records of these users, so re-importing an old export does not bring a forgotten person
# back. Nothing else is kept (no time, no user id: nothing that joins to the tombstone), and
# analysts cannot read it.
retired_pseudonyms = Table(
    "retired_pseudonyms",
    metadata,
    Column("sha256", Text, primary_key=True),
    CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="sha256"),
)

prompts = Table(
    "prompts",
    metadata,
    _id(),
    Column("text", Text, nullable=False),
    Column("negative_text", Text, nullable=False, server_default=""),
    # sha256 of the normalized (text, negative_text): one row per distinct prompt.
    Column("norm_hash", Text, nullable=False, unique=True),
    # sha256 of the normalized text alone (`db.prompts.text_hash`): what the classifier and
    # the exports see, so what train/test splits are decided on (equal to `norm_hash` when
    # there is no negative prompt).
    Column("text_hash", Text, nullable=False, index=True),
    Column("contains_name", Boolean, nullable=False, server_default=text("false")),
    _now("created_at"),
)

model_versions = Table(
    "model_versions",
    metadata,
    _id(),
    Column("kind", Text, nullable=False),
    Column("name", Text, nullable=False, unique=True),
    Column("parent_id", BigInteger, ForeignKey("model_versions.id"), nullable=True),
    Column(
        "artifact", Text, nullable=False
    ),  # a store key models/<name>/<sha256>, or a hub id/folder
    Column("sha256", Text, nullable=True),
    Column("config", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("metrics", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("status", Text, nullable=False, server_default="candidate"),
    _now("created_at"),
    _at("promoted_at"),
    _at("retired_at"),
    CheckConstraint(_in("kind", MODEL_KINDS), name="kind"),
    CheckConstraint(_in("status", MODEL_STATUSES), name="status"),
    Index(
        "uq_model_versions_one_serving",
        "kind",
        unique=True,
        postgresql_where=text("status = 'serving'"),
    ),
)

model_events = Table(
    "model_events",
    metadata,
    _id(),
    Column(
        "model_version_id",
        BigInteger,
        ForeignKey("model_versions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("action", Text, nullable=False),
    Column("actor", Text, nullable=True),
    Column("reason", Text, nullable=True),
    _now("created_at"),
    # A promotion's, retirement's or rollback's notice (the NOTIFY payload), and when the
    # bot posted it to Discord.
    Column("notice", JSONB, nullable=True),
    _at("announced_at"),
    CheckConstraint(_in("action", MODEL_ACTIONS), name="action"),
    Index(
        "ix_model_events_unannounced",
        "id",
        postgresql_where=text("announced_at IS NULL AND notice IS NOT NULL"),
    ),
)

rounds = Table(
    "rounds",
    metadata,
    _id(),
    Column("prompt_id", BigInteger, ForeignKey("prompts.id"), nullable=False, index=True),
    Column("requester_id", BigInteger, ForeignKey("users.id"), nullable=True),
    Column("source", Text, nullable=False, server_default="discord"),
    Column("external_id", Text, nullable=True),
    # An imported record's content key (`db.datasets.import_key`): imports are idempotent.
    Column("import_key", Text, nullable=True),
    # The round's exact prompt where it differs from its prompt row's first spelling.
    Column("prompt_text", Text, nullable=True),
    Column("split", Text, nullable=True),
    Column("guild_id", BigInteger, nullable=True),
    Column("channel_id", BigInteger, nullable=True),
    Column("message_id", BigInteger, nullable=True),
    Column("params", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("k", SmallInteger, nullable=False),
    Column("status", Text, nullable=False, server_default="queued"),
    Column("error", Text, nullable=True),
    _now("created_at"),
    _at("started_at"),
    _at("ready_at"),
    _at("closed_at"),
    # The status the round's Discord message last showed (the bot catches up on the rest).
    Column("shown_status", Text, nullable=True),
    # The version that served the round (its A/B plan's incumbent: `pipeline.serving`); in
    # an A/B round the other version shown is the candidate under test. NULL for imported
    # rounds, and for rounds made before migration 0016 whose generate job is gone.
    Column("incumbent_version_id", BigInteger, ForeignKey("model_versions.id"), nullable=True),
    CheckConstraint(_in("source", ("discord", "import")), name="source"),
    CheckConstraint("split IS NULL OR " + _in("split", ("train", "test")), name="split"),
    CheckConstraint("k BETWEEN 1 AND 16", name="k"),
    CheckConstraint(_in("status", ROUND_STATUSES), name="status"),
    CheckConstraint(
        "shown_status IS NULL OR " + _in("shown_status", ROUND_STATUSES), name="shown_status"
    ),
    UniqueConstraint("import_key"),
    Index("ix_rounds_requester_id_created_at", "requester_id", "created_at"),
    Index("ix_rounds_status_created_at", "status", "created_at"),
    Index("ix_rounds_created_at", "created_at"),
)

images = Table(
    "images",
    metadata,
    _id(),
    Column("round_id", BigInteger, ForeignKey("rounds.id", ondelete="CASCADE"), nullable=False),
    Column("position", SmallInteger, nullable=False),
    Column(
        "model_version_id", BigInteger, ForeignKey("model_versions.id"), nullable=True, index=True
    ),
    Column("seed", BigInteger, nullable=True),
    Column("sha256", Text, nullable=False, index=True),
    Column("storage_key", Text, nullable=False),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    # Flagged by the safety checker: recorded, never posted.
    Column("nsfw", Boolean, nullable=False, server_default=text("false")),
    Column("hps_score", REAL, nullable=True),
    Column("hps_version_id", BigInteger, ForeignKey("model_versions.id"), nullable=True),
    _now("created_at"),
    CheckConstraint("position BETWEEN 1 AND 16", name="position"),
    CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="sha256"),
    UniqueConstraint("round_id", "position"),
    # The scheduled scoring's queue: shown images without a score, newest first.
    Index(
        "ix_images_unscored",
        "id",
        postgresql_where=text("hps_score IS NULL AND NOT nsfw"),
    ),
)

choices = Table(
    "choices",
    metadata,
    _id(),
    Column("round_id", BigInteger, ForeignKey("rounds.id", ondelete="CASCADE"), nullable=False),
    Column(
        "user_id",
        BigInteger,
        ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("verdict", Text, nullable=False),
    Column("chosen_position", SmallInteger, nullable=True),
    Column("is_requester", Boolean, nullable=False),
    Column("flagged", Boolean, nullable=False, server_default=text("false")),
    Column("revision", Integer, nullable=False, server_default=text("1")),
    _now("created_at"),
    _now("updated_at"),
    # The Discord interaction (a time-ordered snowflake) of the click the choice holds.
    Column("interaction_id", BigInteger, nullable=True),
    CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
    CheckConstraint("(verdict = 'pick') = (chosen_position IS NOT NULL)", name="pick_position"),
    UniqueConstraint("round_id", "user_id"),
    ForeignKeyConstraint(
        ["round_id", "chosen_position"],
        ["images.round_id", "images.position"],
        name="fk_choices_chosen_image",
    ),
    Index("ix_choices_created_at", "created_at"),
    Index("ix_choices_updated_at", "updated_at"),
)

choice_events = Table(
    "choice_events",
    metadata,
    _id(),
    Column(
        "round_id",
        BigInteger,
        ForeignKey("rounds.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column(
        "user_id",
        BigInteger,
        ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("verdict", Text, nullable=False),
    Column("chosen_position", SmallInteger, nullable=True),
    Column("is_requester", Boolean, nullable=False),
    Column("flagged", Boolean, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("interaction_id", BigInteger, nullable=True),
    _now("created_at"),
    CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
    CheckConstraint(_in("outcome", CHOICE_OUTCOMES), name="outcome"),
)

jobs = Table(
    "jobs",
    metadata,
    _id(),
    Column("kind", Text, nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("state", Text, nullable=False, server_default="queued"),
    Column("priority", SmallInteger, nullable=False, server_default=text("0")),
    Column("dedupe_key", Text, nullable=True, unique=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("3")),
    _now("run_after"),
    Column("worker_id", Text, nullable=True),
    _at("lease_expires_at"),
    _at("heartbeat_at"),
    _now("created_at"),
    _at("started_at"),
    _at("finished_at"),
    Column("result", JSONB, nullable=True),
    Column("error", Text, nullable=True),
    Column("requested_by", Text, nullable=True),
    _at("announced_at"),  # when the bot posted a finished job's outcome to Discord
    CheckConstraint(_in("state", JOB_STATES), name="state"),
    CheckConstraint("max_attempts >= 1", name="max_attempts"),
    Index(
        "ix_jobs_queued",
        "kind",
        text("priority DESC"),
        "run_after",
        "id",
        postgresql_where=text("state = 'queued'"),
    ),
    Index(
        "ix_jobs_running_lease",
        "lease_expires_at",
        postgresql_where=text("state = 'running'"),
    ),
    Index("ix_jobs_kind_state", "kind", "state"),
    Index(
        "ix_jobs_unannounced",
        "id",
        postgresql_where=text(
            "announced_at IS NULL AND state IN ('done', 'dead') "
            "AND kind IN ('train_classifier', 'adapt_sd')"
        ),
    ),
)

workers = Table(
    "workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("kinds", ARRAY(Text), nullable=False),
    Column("device", Text, nullable=False),
    _now("started_at"),
    _now("last_seen_at"),
    _at("stopped_at"),
    Column("current_job_id", BigInteger, nullable=True),
)

SERVICE_KINDS = ("bot", "scheduler")

# The bot's and the scheduler's liveness (workers have their own table): each process
# heartbeats its row; `hps health` and `/status` read them.
services = Table(
    "services",
    metadata,
    Column("id", Text, primary_key=True),  # kind:hostname:pid
    Column("kind", Text, nullable=False),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    _now("started_at"),
    _now("last_seen_at"),
    _at("stopped_at"),
    # What the process reports about itself, e.g. the bot's gateway connection.
    Column("state", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    CheckConstraint(_in("kind", SERVICE_KINDS), name="kind"),
    Index("ix_services_kind_last_seen_at", "kind", "last_seen_at"),
)

# Messages the bot posted about a round besides its main message (`rounds.message_id`),
# such as the requester's chosen image: forgetting the requester deletes them too.
round_messages = Table(
    "round_messages",
    metadata,
    Column("message_id", BigInteger, primary_key=True),
    Column("round_id", BigInteger, ForeignKey("rounds.id", ondelete="CASCADE"), nullable=False),
    Column("channel_id", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    _now("created_at"),
    CheckConstraint(_in("kind", ("chosen",)), name="kind"),
    Index("ix_round_messages_round_id", "round_id"),
)

# Discord messages the bot must delete (those of forgotten users' rounds), queued in the
# transaction that forgets, whoever forgets (/forget-me or `hps users forget`): the bot
# deletes them and the rows.
message_deletions = Table(
    "message_deletions",
    metadata,
    _id(),
    Column("guild_id", BigInteger, nullable=True),
    Column("channel_id", BigInteger, nullable=False),
    Column("message_id", BigInteger, nullable=False, unique=True),
    Column("reason", Text, nullable=False),
    _now("requested_at"),
    _at("claimed_at"),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("error", Text, nullable=True),
    # When the bot may try it (again): failures back off, so they never block the others.
    _now("next_attempt_at"),
    # The bot gave up (Discord refused for good, or too many attempts): a moderator's turn.
    _at("gave_up_at"),
    Index(
        "ix_message_deletions_next_attempt_at",
        "next_attempt_at",
        postgresql_where=text("gave_up_at IS NULL"),
    ),
)

# Image files that forgetting left unreferenced, recorded in its transaction and deleted
# after its commit (`db.images.delete_pending`); those whose deletion failed (the store
# unreachable) stay here and are tried again, with backoff, by the bot.
image_deletions = Table(
    "image_deletions",
    metadata,
    _id(),
    Column("storage_key", Text, nullable=False, unique=True),
    _now("requested_at"),
    _now("next_attempt_at"),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("error", Text, nullable=True),
    Index("ix_image_deletions_next_attempt_at", "next_attempt_at"),
)

# `hps eval --scorers`: how often each reward model agrees with people's choices. The rows
# of one evaluation share `evaluated_at` (its transaction's time).
scorer_agreement = Table(
    "scorer_agreement",
    metadata,
    _id(),
    _now("evaluated_at"),
    Column("source", Text, nullable=False),  # "choices" (the database) or a dataset folder
    Column("split", Text, nullable=False),
    Column("examples", Text, nullable=False),  # the examples' fingerprint
    Column("scorer", Text, nullable=False),  # its name: hps, hpsv2, pickscore, ...
    Column("model", Text, nullable=False),  # the weights it loaded, in words
    Column("scale", Text, nullable=False),
    Column("choices", Integer, nullable=False),  # picks scored (ties are counted apart)
    Column("ties", Integer, nullable=False),
    Column("top1", Float, nullable=True),
    Column("top1_low", Float, nullable=True),
    Column("top1_high", Float, nullable=True),
    Column("chance", Float, nullable=True),
    Column("pairwise", Float, nullable=True),
    Column("pairwise_low", Float, nullable=True),
    Column("pairwise_high", Float, nullable=True),
    Column("pairs", Integer, nullable=False),
    Column("report", JSONB, nullable=False),  # the whole report (per K, ...)
    Index("ix_scorer_agreement_evaluated_at", "evaluated_at"),
)
