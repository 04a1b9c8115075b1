from sslrecipe.cli import main

main()
