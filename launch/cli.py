"""Entry point of the `longtrain` command."""

def main():
    print("longtrain")
