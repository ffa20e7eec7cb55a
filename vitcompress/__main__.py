from vitcompress.cli import main

main()
