"""The bot's features, one cog each, loaded by `HPSBot.setup_hook` from `INITIAL_EXTENSIONS`."""
