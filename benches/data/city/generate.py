#!/usr/bin/env python3
"""Writes the city workload of `city-bench --workload personas` (personas.jsonl, scenes.json, lines.json).

Deterministic (seeded): run it again and the files are the same. Each persona is an NPC's system message of
roughly 300-500 tokens: who they are, where they live and work, their past, their traits (which also pick
trait-LoRAs), how they speak, what they want, what they hide, and how to behave. Scenes are short context
lines added after the persona; player lines are what players say.
"""
import json
import os
import random

R = random.Random(20261202)
HERE = os.path.dirname(os.path.abspath(__file__))

FIRST = ["Marta", "Brannoc", "Ilse", "Tomas", "Wren", "Odile", "Caspar", "Nell", "Hadrik", "Sefa", "Joren",
         "Perpetua", "Aldo", "Mireille", "Konstantin", "Yara", "Bastian", "Ottilie", "Ferris", "Greta", "Lucan",
         "Imke", "Dorian", "Saskia", "Emeric", "Rosalind", "Piet", "Agathe", "Silas", "Fenna", "Anselm", "Livia",
         "Mattis", "Cordelia", "Radek", "Elowen", "Gideon", "Tamsin", "Viktor", "Hester"]
LAST = ["Vell", "Ashgrove", "Marrow", "Quill", "Harrow", "Dunmore", "Sallow", "Keel", "Brack", "Fennick",
        "Orme", "Tallis", "Crane", "Whitlock", "Stroud", "Pell", "Varga", "Lindqvist", "Okonkwo", "Hale"]
DISTRICTS = ["Lowgate", "Saltmarket", "the Tannery Rows", "Copperhill", "the Old Locks", "Gannet Quay",
             "Bellfounders' Lane", "the Ember Ward", "Northcross", "the Glass Gardens", "Cistern Hill",
             "the Weavers' Terraces"]
JOBS = [("harbour-master", "keep the harbour logbook and collect the mooring fees"),
        ("lamplighter", "light the gas lamps of the square every evening at dusk"),
        ("apothecary", "mix tinctures and salves behind a counter of dark oak"),
        ("ferry captain", "run the night ferry across the river between the two halves of the city"),
        ("baker", "bake rye loaves and honey buns before the sun is up"),
        ("city guard sergeant", "command a patrol of six tired guards on the night watch"),
        ("bookseller", "sell second-hand books and maps in a crooked shop"),
        ("blacksmith", "shoe horses and repair tram couplings in a smoky forge"),
        ("fishmonger", "sell the morning catch from a stall that smells of brine and ice"),
        ("clockmaker", "repair pocket watches and the great clock of the guildhall"),
        ("innkeeper", "run a loud inn where sailors and clerks drink side by side"),
        ("street musician", "play the fiddle on the steps of the old cathedral"),
        ("tram conductor", "ring the bell on the number nine tram from dawn to midnight"),
        ("gravedigger", "tend the hillside cemetery and its crooked iron gates"),
        ("tailor", "cut coats for merchants and mend the uniforms of the guard"),
        ("herbalist", "gather herbs in the glass gardens and sell them in paper twists"),
        ("dock crane operator", "work the steam crane that unloads the grain ships"),
        ("schoolteacher", "teach forty noisy children to read in a draughty hall"),
        ("pawnbroker", "lend money against rings, watches and secrets"),
        ("glassblower", "blow lamp chimneys and coloured bottles in a furnace-hot workshop")]
TRAITS = [("gruff", "You are gruff and impatient with small talk."),
          ("kind", "You are kind, and you notice when someone is cold or hungry."),
          ("suspicious", "You are suspicious of strangers and ask them why they want to know."),
          ("cheerful", "You are cheerful even on grey days, and you laugh easily."),
          ("proud", "You are proud of your work and do not like to be corrected."),
          ("nervous", "You are nervous and glance at the door when anyone comes in."),
          ("greedy", "You are greedy and always look for a way to turn a conversation into a sale."),
          ("pious", "You are pious and mention the saints of the city when you are worried."),
          ("curious", "You are curious and ask travellers about the places they have seen."),
          ("bitter", "You are bitter about the past and you blame the council for most things.")]
SPEECH = ["You speak in short, practical sentences and never use two words where one will do.",
          "You speak slowly, and you always mention the weather before anything else.",
          "You talk like an old sailor, with 'aye' and 'ye' and talk of tides and knots.",
          "You speak formally, as you were taught in the temple school, and you never swear.",
          "You speak quickly and jump from one subject to the next.",
          "You speak softly, and you often answer a question with another question.",
          "You use the slang of the dock workers and you call everyone 'friend'.",
          "You speak with great precision, like someone reading from a ledger."]
PAST = ["You were born in {d} and have never lived anywhere else.",
        "You came to {d} twenty years ago from a village in the hills, with nothing but a coat and a letter of introduction.",
        "Your mother ran the same trade before you, and her tools still hang on the wall.",
        "You served three years on a merchant ship before the sea made you sick of it.",
        "You lost your brother in the flood of the Grey Winter, and you never speak of him to strangers.",
        "You were once engaged to a clerk of the city council, but the engagement ended badly.",
        "You learned your trade from an old master who beat you when you were careless and praised you only once.",
        "You spent a winter in the debtors' prison, and you still check your accounts twice every evening.",
        "You won a medal for bravery during the great fire of the Ember Ward, and you keep it in a drawer.",
        "You taught yourself to read from the labels of medicine bottles and shipping crates.",
        "You have two children who work on the river boats and visit only on feast days.",
        "You were a soldier in the border war and you still wake before dawn.",
        "Your late husband built the house you live in, and you refuse every offer to sell it.",
        "You once saw a ghost on the old bridge at midnight, and nobody believes you."]
WANTS = ["You want to save enough money to buy the shop next door.",
         "You want the council to repair the sea wall before the winter storms.",
         "You want to find out who has been stealing from the warehouses on the quay.",
         "You want your apprentice to take the trade seriously.",
         "You want a quiet life and no trouble with the guard.",
         "You want to travel south one day and see the orange groves.",
         "You want to be elected to the guild council next spring.",
         "You want someone to finally believe your story about the ghost on the bridge."]
SECRETS = ["Lately smugglers have been using the old eastern pier at night, and you suspect someone on the council protects them. You say this only to people you trust.",
           "You owe money to the pawnbroker of Copperhill and you are afraid he will tell your family.",
           "You hide letters for a group that meets in the cellar of the old cathedral, and you do not know what they plan.",
           "You found a purse of foreign coins in the river mud and never reported it.",
           "You know which guard takes bribes on the north gate, and you keep that knowledge for a rainy day.",
           "You have been feeding a stray wolfhound behind your house and the neighbours think it is a ghost.",
           "You once forged a signature on a guild certificate, and nobody has ever checked it.",
           "You know the tunnel that runs from the Old Locks to the cemetery, and you have used it twice."]
LIKES = ["strong black tea", "the smell of rain on hot stones", "the bells of the guildhall", "card games at the inn",
         "fresh bread with salted butter", "old sea shanties", "the first snow of the year", "a well-made pair of boots",
         "quiet mornings on the river", "stories about faraway cities"]
DISLIKES = ["people who talk too long without saying anything", "the new electric lights of the northern districts",
            "tax collectors", "rats in the grain stores", "rude children", "the smell of the tanneries",
            "liars and flatterers", "the noise of the steam trams", "merchants from the capital", "wet feet"]
RULES = ["When someone is rude, you go quiet and look away.",
         "You never lie, but you do not always say everything you know.",
         "You offer tea to anyone who comes in out of the rain, even people you dislike.",
         "If a player asks about prices, you answer honestly but you grumble about it.",
         "If a player threatens you, you call for the guard.",
         "You never talk about your secret unless the player has earned your trust."]
TAIL = "Stay in character at all times. Answer the player in one or two sentences, in your own voice."

SCENES = ["It is early morning; fog lies over the river and the lamps are still lit.",
          "It is a market day; the square is crowded and noisy.",
          "It is raining hard, and water runs down the gutters.",
          "It is late at night; only the inn and the guardhouse still have lights.",
          "A procession for the city's patron saint is passing by.",
          "The bells are ringing for a fire somewhere in the Ember Ward.",
          "It is a cold, clear evening, and the first stars are out.",
          "A ship has just come in, and sailors crowd the quay."]
LINES = ["Good evening. Are you still open?", "What do you know about the old eastern pier?",
         "Will it rain tomorrow?", "I'm new in the city. Where should I stay?", "How much for a loaf of bread?",
         "Have you seen a girl with a red scarf?", "Who runs this district, really?", "Can I trust the city guard?",
         "What happened during the Grey Winter?", "Do you need any help with your work?",
         "Where can I find a good blacksmith?", "Why does everyone look so worried today?",
         "Tell me about yourself.", "Is there any work for a stranger here?", "What's the best tavern around?",
         "I heard there's a ghost on the old bridge. Is it true?", "Can you keep a secret?",
         "What do you think of the city council?", "How do I get to the Glass Gardens?", "Goodbye, and thank you."]


def persona(i):
    first, last = FIRST[i % len(FIRST)], LAST[(i * 7) % len(LAST)]
    district = DISTRICTS[(i * 5) % len(DISTRICTS)]
    job, does = JOBS[i % len(JOBS)]
    age = R.randint(19, 74)
    traits = R.sample(TRAITS, 2)
    parts = [f"You are {first} {last}, the {job} of {district}, a district of the great river city.",
             f"You are {age} years old, and every day you {does}."]
    parts += [p.format(d=district) for p in R.sample(PAST, R.randint(3, 5))]
    parts += [t for _, t in traits]
    parts.append(R.choice(SPEECH))
    likes, dislikes = R.sample(LIKES, 2), R.sample(DISLIKES, 2)
    parts.append(f"You like {likes[0]} and {likes[1]}; you cannot stand {dislikes[0]} or {dislikes[1]}.")
    parts += R.sample(WANTS, 2)
    parts.append(R.choice(SECRETS))
    others = R.sample(range(100), 2)
    parts.append(f"You know {FIRST[others[0] % len(FIRST)]} {LAST[(others[0] * 7) % len(LAST)]} well and trust them; "
                 f"you have quarrelled with {FIRST[others[1] % len(FIRST)]} {LAST[(others[1] * 7) % len(LAST)]} "
                 f"and avoid them at the market.")
    parts += R.sample(RULES, R.randint(3, 5))
    parts.append(TAIL)
    # Sailors talk like sailors; the terse voice for the gruff.
    voice = {}
    if "sailor" in parts[-1] or any("old sailor" in p for p in parts) or job in ("ferry captain", "harbour-master"):
        voice["sailor"] = 0.8
    if any(t == "gruff" for t, _ in traits):
        voice["terse"] = 0.6
    return {"id": f"{first.lower()}-{last.lower()}-{i}", "district": district, "job": job,
            "traits": [t for t, _ in traits], "voice": voice, "persona": " ".join(parts)}


def main():
    with open(os.path.join(HERE, "personas.jsonl"), "w") as f:
        for i in range(100):
            f.write(json.dumps(persona(i)) + "\n")
    with open(os.path.join(HERE, "scenes.json"), "w") as f:
        json.dump(SCENES, f, indent=1)
        f.write("\n")
    with open(os.path.join(HERE, "lines.json"), "w") as f:
        json.dump(LINES, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
