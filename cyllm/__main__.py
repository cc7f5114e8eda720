from cyllm.cli import app

app(prog_name="cyllm")
