from workbench.cli import console

console()
