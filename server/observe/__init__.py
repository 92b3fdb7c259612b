"""Operations: the admin API and the tables the CLI prints."""
