"""What an evaluation leaves for people: figures and report.md."""
