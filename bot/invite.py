"""What the bot needs in a server, and the invite URL that asks for exactly that.

The permissions are the ones the bot uses: seeing the channel, posting rounds and their
images (also in threads, where /dream may run), and reading the channel's history, which
editing and deleting its own earlier messages by id needs. Interaction replies and
follow-ups need none of them; deleting its own messages needs no Manage Messages.
docs/deploy.md prints the same integer (a test keeps them equal).
"""

from __future__ import annotations

import discord

PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    attach_files=True,
    read_message_history=True,
)
SCOPES = ("bot", "applications.commands")


def invite_url(application_id: int) -> str:
    """The OAuth2 URL that adds the bot to a server with `PERMISSIONS`."""
    return discord.utils.oauth_url(application_id, permissions=PERMISSIONS, scopes=SCOPES)
