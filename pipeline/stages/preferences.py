"""Preferences: accepted.<lane> -> routed.<lane>. Opt-outs, quiet hours, channel choice; one task per channel.

User settings arrive on the compacted, co-partitioned user-settings topic and are kept in a Faust table of this
stage's app, so the partition of a user's requests and of their settings land on the same worker: each
decision is a local read, never a database call. A quiet-hours deferral is held durably (pipeline/stages/holds)
and comes back to accepted.<lane> when the window ends, marked so that it is not deferred again.
"""

from __future__ import annotations

from typing import Any

from pipeline import db, serde, topics
from pipeline.errors import DecodeError
from pipeline.policy import preferences as policy
from pipeline.stages import holds
from pipeline.stages.runtime import HEADER_RELEASED, StageContext, guarded, header, utcnow

INSERT_SUPPRESSED = """
INSERT INTO deliveries (notification_id, channel, state, last_error_code, final_at)
VALUES (%s, %s, 'suppressed', %s, now())
ON CONFLICT (notification_id, channel) DO NOTHING
"""


def delivery_task(request: dict[str, Any], target: Any, lane: str) -> dict[str, Any]:
    return {
        "notification_id": request["notification_id"],
        "user_id": request["user_id"],
        "type": request["type"],
        "lane": lane,
        "channel": target.channel,
        "address": target.address,
        "device_tokens": [{"platform": t.platform, "token": t.token} for t in target.device_tokens],
        "template_id": request.get("template_id"),
        "template_params": request.get("template_params") or {},
        "content": request.get("content"),
        "locale": request.get("locale") or "en",
        "attempt": 0,
        "created_at": request["created_at"],
        "expires_at": request.get("expires_at"),
        "correlation_id": request.get("correlation_id"),
    }


def build(ctx: StageContext) -> None:
    app, lane = ctx.app, ctx.lane
    partitions = topics.spec(topics.USER_SETTINGS).partitions
    # user id -> encoded UserSettings (bytes: the table's changelog needs no codec of its own)
    user_settings = app.Table("user-settings", default=None, key_type=str, value_type=bytes, partitions=partitions)
    settings_cache: dict[str, tuple[bytes, dict[str, Any]]] = {}

    def settings_for(user_id: str) -> dict[str, Any] | None:
        raw = user_settings.get(user_id)
        if raw is None:
            return None
        cached = settings_cache.get(user_id)
        if cached is None or cached[0] != raw:
            cached = (raw, ctx.codec.decode(raw, expected=serde.USER_SETTINGS).value)
            settings_cache[user_id] = cached
        return cached[1]

    async def handle_settings(ctx: StageContext, event: Any) -> str:
        if event.value is None:  # a tombstone: the user's settings were deleted
            user_settings.pop(event.key.decode(), None)
            return "settings_deleted"
        try:
            _, value = ctx.codec.decode(event.value, expected=serde.USER_SETTINGS)
        except DecodeError as exc:
            await ctx.quarantine(event, exc.reason, str(exc))
            return "undecodable"
        current = settings_for(value["user_id"])
        if current is not None and current["version"] > value["version"]:
            return "settings_stale"  # an older write arriving late never overrides a newer one
        user_settings[value["user_id"]] = event.value
        return "settings_updated"

    async def handle(ctx: StageContext, event: Any) -> str:
        request = await ctx.decode_or_quarantine(event, serde.NOTIFICATION_REQUEST)
        if request is None:
            return "undecodable"
        now = utcnow()
        released = header(event, HEADER_RELEASED) is not None
        decision = policy.decide(request, settings_for(request["user_id"]), now)
        notification_id = str(request["notification_id"])

        if decision.deferred_until is not None and not released:
            await holds.hold(ctx, hold_id=f"quiet:{notification_id}", topic=topics.accepted_topic(lane),
                             key=request["user_id"], value=event.value, reason="quiet_hours",
                             notification_id=notification_id, due_at=decision.deferred_until)
            await ctx.emit(request, "deferred", error_code="quiet_hours",
                           error_message=f"held until {decision.deferred_until.isoformat()}")
            return "deferred"

        if decision.suppressed:
            pool = await db.async_pool(ctx.settings)
            async with pool.connection() as conn:
                for channel, reason in decision.suppressed:
                    await conn.execute(INSERT_SUPPRESSED, (notification_id, channel, reason))
            for channel, reason in decision.suppressed:
                await ctx.emit(request, "suppressed", channel=channel, error_code=reason)
        for target in decision.send:
            task = delivery_task(request, target, lane)
            await ctx.send(topics.routed_topic(lane), request["user_id"],
                           ctx.codec.encode(serde.DELIVERY_TASK, task))
        return "routed" if decision.send else "suppressed"

    @app.agent(ctx.topic(topics.USER_SETTINGS), name=f"user-settings-{lane}")
    async def settings_feed(stream: Any) -> None:
        async for event in stream.events():
            await guarded(ctx, event, handle_settings)

    @app.agent(ctx.topic(topics.accepted_topic(lane)), name=f"preferences-{lane}")
    async def preferences(stream: Any) -> None:
        async for event in stream.events():
            await guarded(ctx, event, handle)

    holds.add_releaser(ctx, [topics.accepted_topic(lane)])
