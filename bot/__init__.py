"""Everything Discord: the client (`bot.client.HPSBot`), one cog per feature in `bot/cogs/`
(each with its own buttons), and small helpers (`buttons`, `replies`, `checks`, `formats`,
`imaging`). It talks to workers only
through the database and the job queue, and never imports torch or `pipeline`.
"""
