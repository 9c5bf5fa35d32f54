"""Process settings: the environment and an optional .env file, read once at start-up."""
