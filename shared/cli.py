def main(): print("umi")
