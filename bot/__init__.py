"""Everything Discord: the client (`bot.client.HPSBot`), one cog per feature in `bot/cogs/`,
and small helpers (`checks`, `formats`, `views`, `uploads`). It talks to workers only
through the database and the job queue, and never imports torch or `pipeline`.
"""
